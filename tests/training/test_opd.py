"""On-policy distillation: PAD compaction, divergences (incl. the score-function estimator), rollout rows, the whole
OPD loss on a student built to equal its teacher, and a short PipoOPDTrainer run on the pattern task."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from conftest import EOS_ID, PAD_ID, tiny_backbone_config
from pipo_task import EMBED_SCALE, pad_tokenizer, pattern_records, train_pattern_teacher
from transformers_pipo import PipoForCausalLM
from transformers_pipo.training import PipoDataCollator
from transformers_pipo.training.losses import (
    FILL_LABEL,
    chunked_divergence,
    compact_pads,
    divergence_from_logits,
    map_back,
    opd_loss,
    resolve_fill_labels,
    teacher_slots,
)

P = PAD_ID


# ----------------------------------------------------------------------------------------------------------------------
# PAD compaction (DESIGN §2.5d)
# ----------------------------------------------------------------------------------------------------------------------


def test_compact_pads_exact():
    ids = torch.tensor([[5, 6, 7, P, 8, P, 9, 10], [5, P, 6, 7, P, P, P, P]])
    mask = torch.tensor([[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]])
    keep = mask.bool() & (ids != P)
    compact, cmask, index = compact_pads(ids, keep, P)
    assert compact.tolist() == [[5, 6, 7, 8, 9, 10], [5, 6, 7, P, P, P]]
    assert cmask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert index.tolist() == [[0, 1, 2, 2, 3, 3, 4, 5], [0, 0, 1, 2, 2, 2, 2, 2]]
    values = (torch.arange(6).float().expand(2, 6) + torch.tensor([[0.0], [100.0]])).unsqueeze(-1)
    mapped = map_back(values, index)
    assert mapped[..., 0].tolist() == [[0, 1, 2, 2, 3, 3, 4, 5], [100, 100, 101, 102, 102, 102, 102, 102]]
    back, mtp = teacher_slots(mapped)
    # backbone latent j <-> position 2j+1; MTP position j <-> position 2j+2
    assert back[0, :, 0].tolist() == [1, 2, 3] and mtp[0, :, 0].tolist() == [2, 3, 4]


@st.composite
def pipo_rows(draw):
    """A row in pair layout: token1 slots real, draft slots real or PAD."""
    n_pairs = draw(st.integers(2, 9))
    ids = []
    for _ in range(n_pairs):
        ids.append(draw(st.integers(3, 50)))
        ids.append(P if draw(st.booleans()) else draw(st.integers(3, 50)))
    return ids


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(pipo_rows(), min_size=1, max_size=3))
def test_mapped_teacher_targets_are_the_next_real_tokens(rows):
    """With an oracle teacher whose output at compacted position k is the next real token c[k+1], every backbone
    slot reads x[2j+2] and every MTP slot reads the next real token after token1 x[2j+2] (x[2j+3] unless PAD)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), P)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    keep = mask.bool() & (ids != P)
    compact, cmask, index = compact_pads(ids, keep, P)
    following = torch.where(cmask[:, 1:].bool(), compact[:, 1:], torch.full_like(compact[:, 1:], -1))
    oracle = torch.cat([following, torch.full((len(rows), 1), -1)], dim=1)  # next real token (or -1)
    back, mtp = teacher_slots(map_back(oracle.unsqueeze(-1), index))
    for b, r in enumerate(rows):
        for j in range(len(r) // 2 - 1):
            assert int(back[b, j]) == r[2 * j + 2]
            assert int(mtp[b, j]) == _next_real(r, 2 * j + 2)


def _next_real(row, position):
    for t in row[position + 1 :]:
        if t != P:
            return t
    return -1


# ----------------------------------------------------------------------------------------------------------------------
# Divergences (DESIGN §2.5f)
# ----------------------------------------------------------------------------------------------------------------------


def _generalized_jsd(student, teacher, beta):
    """The generalised JSD of the GKD paper in trl's convention, written out over float64 probabilities:
    β·KL(p_t ‖ m) + (1-β)·KL(p_s ‖ m) with m = β·p_t + (1-β)·p_s; β = 0 is KL(p_t ‖ p_s), β = 1 is KL(p_s ‖ p_t)."""
    p_s, p_t = torch.softmax(student.double(), -1), torch.softmax(teacher.double(), -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if beta == 0:
        return kl(p_t, p_s)
    if beta == 1:
        return kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5, 0.2])
def test_full_divergence_matches_the_generalized_jsd(beta):
    torch.manual_seed(0)
    s, t = torch.randn(7, 11) * 2, torch.randn(7, 11) * 2
    y = torch.randint(0, 11, (7,))
    out = divergence_from_logits(s, t, y, "full", beta=beta)
    torch.testing.assert_close(out.loss, _generalized_jsd(s, t, beta).float(), atol=1e-5, rtol=1e-5)


def test_full_divergence_exact_values():
    s = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    t = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    out = divergence_from_logits(s, t, torch.tensor([0]), "full")
    assert out.loss.item() == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5), abs=1e-6)
    assert out.alpha.item() == pytest.approx(0.25 + 0.25 + 0.25, abs=1e-6)  # sum of min(p_s, p_t) = 1 - TV
    same = divergence_from_logits(s, s, torch.tensor([1]), "full")
    assert same.loss.item() == pytest.approx(0.0, abs=1e-7) and same.alpha.item() == pytest.approx(1.0)


def test_topk_divergence_over_the_union():
    torch.manual_seed(1)
    s, t = torch.randn(5, 20), torch.randn(5, 20)
    y = torch.randint(0, 20, (5,))
    out = divergence_from_logits(s, t, y, "topk", topk=3)
    for n in range(5):
        union = sorted(set(s[n].topk(3).indices.tolist()) | set(t[n].topk(3).indices.tolist()) | {int(y[n])})
        ls, lt = torch.log_softmax(s[n, union], -1), torch.log_softmax(t[n, union], -1)
        expected = (ls.exp() * (ls - lt)).sum()
        assert out.loss[n].item() == pytest.approx(expected.item(), abs=1e-5)
        k = union.index(int(y[n]))
        assert out.alpha[n].item() == pytest.approx(min(1.0, math.exp(lt[k] - ls[k])), abs=1e-5)
    # With K >= V the union is the vocabulary: topk == full.
    full = divergence_from_logits(s, t, y, "full")
    wide = divergence_from_logits(s, t, y, "topk", topk=50)
    torch.testing.assert_close(wide.loss, full.loss, atol=1e-5, rtol=1e-5)


def test_sampled_value_and_alpha():
    s = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    t = torch.log(torch.tensor([[0.25, 0.25, 0.5], [0.25, 0.25, 0.5]]))
    out = divergence_from_logits(s, t, torch.tensor([0, 2]), "sampled")
    assert out.divergence.tolist() == pytest.approx([math.log(2), math.log(0.5)], abs=1e-6)
    assert out.loss.tolist() == pytest.approx(out.divergence.tolist(), abs=1e-6)  # the value is the estimate
    assert out.alpha.tolist() == pytest.approx([0.5, 1.0], abs=1e-6)  # min(1, p_t(y) / p_s(y))
    with pytest.raises(ValueError, match="beta"):
        divergence_from_logits(s, t, torch.tensor([0, 2]), "sampled", beta=0.5)


def _kl(s, t):
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    return (ls.exp() * (ls - lt)).sum()


def test_sampled_estimator_gradient_is_the_kl_gradient_where_the_reference_is_zero():
    """E_{y~p_s}[∇ loss(y)] must equal ∇ KL(p_s || p_t) (score-function form); the reference form
    `log p_s(y) - log p_t(y)` has expected gradient E[∇ log p_s(y)] = 0 and never moves the student."""
    torch.manual_seed(0)
    vocab = 8
    s = (torch.randn(vocab) * 1.5).requires_grad_()
    t = torch.randn(vocab) * 1.5
    true_grad = torch.autograd.grad(_kl(s, t), s)[0]
    p_s = torch.softmax(s, -1).detach()

    ys = torch.arange(vocab)
    ours = divergence_from_logits(s.expand(vocab, vocab), t.expand(vocab, vocab), ys, "sampled").loss
    expected_ours = torch.autograd.grad((p_s * ours).sum(), s)[0]  # exact expectation over y ~ p_s
    log_ps, log_pt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    reference = log_ps[ys] - log_pt[ys]
    expected_reference = torch.autograd.grad((p_s * reference).sum(), s)[0]

    torch.testing.assert_close(expected_ours, true_grad, atol=1e-6, rtol=1e-5)
    assert true_grad.norm() > 0.1
    assert expected_reference.norm() < 1e-6
    # A step along the expected gradient moves the student toward the teacher; the reference form does not.
    with torch.no_grad():
        kl0 = _kl(s, t)
        assert _kl(s - 0.5 * expected_ours, t) < kl0 - 0.01
        assert _kl(s - 0.5 * expected_reference, t) == pytest.approx(kl0.item(), abs=1e-6)

    # Monte-Carlo: the average gradient over sampled y points the same way as the true gradient.
    gen = torch.Generator().manual_seed(1)
    y = torch.multinomial(p_s, 20000, replacement=True, generator=gen)
    mc = divergence_from_logits(s.expand(len(y), vocab), t.expand(len(y), vocab), y, "sampled").loss.mean()
    mc_grad = torch.autograd.grad(mc, s)[0]
    assert torch.nn.functional.cosine_similarity(mc_grad, true_grad, dim=0) > 0.95


def test_masked_pad_column_and_fill_labels():
    torch.manual_seed(2)
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    labels = torch.tensor([1, FILL_LABEL, 2, FILL_LABEL])
    s_req = s.clone().requires_grad_()
    out = chunked_divergence(s_req, t, labels, _Head(), _Head(), mode="full", chunk_size=3, masked_token_ids=[5])
    assert out.labels.tolist()[0] == 1 and out.labels.tolist()[2] == 2
    masked_s = s.clone()
    masked_s[:, 5] = -float("inf")
    assert out.labels[1].item() == masked_s[1].argmax().item()  # argmax of the student, PAD excluded
    ref = divergence_from_logits(masked_s, torch.where(torch.arange(6) == 5, -float("inf"), t), out.labels, "full")
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.sum().backward()
    assert torch.isfinite(s_req.grad).all() and s_req.grad[:, 5].abs().max() == 0
    sampled = resolve_fill_labels(masked_s, labels, "sampled", torch.Generator().manual_seed(0))
    assert sampled[0] == 1 and 0 <= int(sampled[1]) < 5


class _Head(torch.nn.Module):
    def forward(self, x):
        return x


def test_chunking_does_not_change_values_or_gradients():
    torch.manual_seed(3)
    head = torch.nn.Linear(8, 13, bias=False)
    h = torch.randn(10, 8, requires_grad=True)
    th = torch.randn(10, 8)
    y = torch.randint(0, 13, (10,))
    grads = []
    for chunk in (3, 100):
        out = chunked_divergence(h, th, y, head, head, mode="topk", topk=4, chunk_size=chunk)
        grads.append(torch.autograd.grad(out.loss.sum(), h)[0])
        if chunk == 3:
            first = out.loss.detach()
    torch.testing.assert_close(first, out.loss.detach())
    torch.testing.assert_close(grads[0], grads[1])


# ----------------------------------------------------------------------------------------------------------------------
# Rollout rows
# ----------------------------------------------------------------------------------------------------------------------


def test_rollout_rows_exact():
    from transformers_pipo.training.opd import pad_rows, rollout_rows

    out = SimpleNamespace(
        pipo_prompt_ids=[torch.tensor([5, 6, 7, P]), torch.tensor([8, 9])],
        pipo_slot_ids=torch.tensor([[10, 11, 12, P, EOS_ID], [13, P, 14, 15, P]]),
        pipo_slot_lengths=torch.tensor([5, 4]),
    )
    rows = rollout_rows(out, P)
    assert rows[0] == ([5, 6, 7, P, 10, 11, 12, P, EOS_ID, P], [-100] * 4 + [10, 11, 12, -100, EOS_ID, -100])
    assert rows[1] == ([8, 9, 13, P, 14, 15], [-100, -100, 13, -100, 14, 15])
    ids, mask, labels = pad_rows(rows, P)
    assert ids.shape == (2, 10) and mask[1].tolist() == [1] * 6 + [0] * 4
    bad = SimpleNamespace(pipo_prompt_ids=[torch.tensor([5, 6])], pipo_slot_ids=torch.tensor([[P, 3]]),
                          pipo_slot_lengths=torch.tensor([2]))
    with pytest.raises(ValueError, match="token1"):
        rollout_rows(bad, P)


def test_real_rollout_rows_hold_exactly_the_generated_tokens():
    from transformers_pipo.training.opd import rollout_rows

    from conftest import tiny_pipo

    model = tiny_pipo("qwen3")
    prompts = torch.tensor([[P, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    torch.manual_seed(0)
    out = model.generate(prompts, attention_mask=mask, do_sample=True, max_new_tokens=9, pad_token_id=P,
                         pipo_confidence_threshold=0.5, return_dict_in_generate=True)
    for b, (ids, labels) in enumerate(rollout_rows(out, P)):
        n_prompt = len(out.pipo_prompt_ids[b])
        generated = [t for t in out.sequences[b, prompts.shape[1]:].tolist()]
        generated = generated[: len([t for t in ids[n_prompt:] if t != P])]
        assert [t for t in ids[n_prompt:] if t != P] == generated
        assert all(y == -100 for y in labels[:n_prompt])
        assert all(i % 2 == 1 for i, t in enumerate(ids) if t == P)


# ----------------------------------------------------------------------------------------------------------------------
# The whole OPD loss on a student that equals its teacher
# ----------------------------------------------------------------------------------------------------------------------


def matched_student_and_teacher():
    """A Llama teacher whose layers are identity maps (attention and MLP outputs zeroed), so its prediction at p
    depends on token p only, and a PIPO student built from a copy of it whose compressor keeps the second token and
    whose MTP reads token1 only. Then, wherever the pair holds no PAD, the student's backbone slot equals the teacher
    at position 2j+1 and its MTP slot equals the teacher at 2j+2: the divergence must vanish there."""
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_backbone_config("llama"))
    with torch.no_grad():
        teacher.get_input_embeddings().weight.mul_(EMBED_SCALE)
        teacher.lm_head.weight.mul_(EMBED_SCALE)  # untied head: peaked distributions
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    teacher.eval()
    student = PipoForCausalLM.from_backbone(copy.deepcopy(teacher), pad_token_id=P, compressor_type="linear").eval()
    hidden = student.config.hidden_size
    eye, zero = torch.eye(hidden), torch.zeros(hidden, hidden)
    with torch.no_grad():
        student.compressor.linear.weight.copy_(torch.cat([zero, eye], dim=1))  # z = E(second token)
        student.compressor.linear.bias.zero_()
        student.mtp.fc.weight.copy_(torch.cat([eye, zero], dim=1))  # MTP input = norm(E(token1))
    assert student.mtp.decoder_layer().self_attn.o_proj.weight.abs().max() == 0  # copied identity layer
    return student, teacher


@torch.no_grad()
def _masked_kl(h_student, h_teacher, head):
    s, t = head(h_student).float(), head(h_teacher).float()
    s[..., P] = t[..., P] = -float("inf")
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    return float(torch.where(ls.exp() > 0, ls.exp() * (ls - lt), torch.zeros_like(ls)).sum())


@pytest.mark.parametrize("mode", ["full", "sampled", "topk"])
def test_opd_loss_vanishes_where_the_student_matches_its_teacher(mode):
    student, teacher = matched_student_and_teacher()
    # row 0: PADs after the odd prompt and in one draft slot; row 1: no PAD at all (batch-padded)
    ids = torch.tensor([[5, 6, 7, P, 8, 9, 10, P, 11, 12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, P, P, P, P]])
    mask = torch.tensor([[1] * 12, [1] * 8 + [0] * 4])
    labels = torch.where((ids == P) | (torch.arange(12) < 4), torch.tensor(-100), ids)
    labels[1] = torch.tensor([-100, -100, 22, 23, 24, 25, 26, 27, -100, -100, -100, -100])
    with torch.no_grad():
        out = opd_loss(student, teacher, ids, mask, labels, divergence=mode)
    div_b, div_m, alpha = out.backbone_divergence, out.mtp_divergence, out.alpha
    # backbone slot j <-> pair j: row 0 pairs (5,6) (7,P) (8,9) (10,P) (11,12): slots 1 and 3 follow a PAD pair.
    matched_b = [(0, 2), (0, 4), (1, 0), (1, 1), (1, 2)]
    for b, j in matched_b:
        assert abs(div_b[b, j].item()) < 1e-4, (mode, b, j)
    if mode == "full":
        # After (t, PAD) the teacher gives its prediction after t (the last real token), not after PAD.
        emb = student.get_input_embeddings()
        norm = teacher.model.norm
        for j, last_real in ((1, 7), (3, 10)):
            expected = _masked_kl(norm(emb(torch.tensor([P]))), norm(emb(torch.tensor([last_real]))), student.lm_head)
            assert div_b[0, j].item() == pytest.approx(expected, rel=1e-4)
            assert expected > 0.05
    # MTP slots (incl. the PAD draft slots, filled from the student) all match.
    assert out.mtp_valid[0].tolist() == [True] * 5 and out.filled[0].tolist() == [True, False, True, False, False]
    assert torch.nanmean(div_m.abs()).item() < 1e-4
    assert alpha[out.mtp_valid].min().item() > 0.999
    assert out.mtp_loss.abs().item() < 1e-4


def test_opd_loss_ghost_terms_keep_every_head_in_the_graph():
    student, teacher = matched_student_and_teacher()
    student.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = torch.full_like(ids, -100)  # nothing supervised
    out = opd_loss(student, teacher, ids, torch.ones_like(ids), labels)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert student.confidence_head.fc2.weight.grad is not None
    assert student.mtp.fc.weight.grad is not None


# ----------------------------------------------------------------------------------------------------------------------
# A short PipoOPDTrainer run on the pattern task
# ----------------------------------------------------------------------------------------------------------------------


def on_policy_divergence(model, teacher, prompts, seed=123):
    from transformers_pipo.training.opd import pad_rows, rollout_rows

    collator = PipoDataCollator(pad_token_id=P, return_prompts=True, require_response=False, max_pad_ratio=0.0)
    batch = collator(prompts)
    torch.manual_seed(seed)
    model.eval()
    out = model.generate(batch["prompts"], attention_mask=batch["prompt_attention_mask"], do_sample=True,
                         max_new_tokens=16, pad_token_id=P, pipo_confidence_threshold=0.5, return_dict_in_generate=True)
    ids, mask, labels = pad_rows(rollout_rows(out, P), P)
    with torch.no_grad():
        res = opd_loss(model, teacher, ids, mask, labels, divergence="full")
    return {
        "backbone_kl": torch.nanmean(res.backbone_divergence).item(),
        "mtp_kl": torch.nanmean(res.mtp_divergence).item(),
        "alpha": torch.nanmean(res.alpha).item(),
        "commit_rate": out.commit_rate.mean().item(),
    }


def test_short_opd_run_lowers_the_divergence(tmp_path):
    from transformers_pipo import PipoOPDConfig, PipoOPDTrainer

    torch.set_num_threads(1)
    teacher = train_pattern_teacher(steps=150)
    # The student is the PIPO conversion of the teacher's own backbone (its new heads untrained).
    student = PipoForCausalLM.from_backbone(copy.deepcopy(teacher), pad_token_id=P).eval()
    prompts = [{"prompt_ids": r["prompt_ids"]} for r in pattern_records(64, seed=5)]
    before = on_policy_divergence(student, teacher, prompts[:16])
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    args = PipoOPDConfig(
        output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=10,
        max_new_tokens=16, pipo_confidence_threshold=0.5, divergence="topk", report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = PipoOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                             processing_class=pad_tokenizer())
    trainer.train()
    after = on_policy_divergence(student, teacher, prompts[:16])
    print(f"\non-policy full KL before {before} after {after}")
    assert after["backbone_kl"] < 0.5 * before["backbone_kl"]
    assert after["mtp_kl"] < 0.5 * before["mtp_kl"]
    assert after["alpha"] > before["alpha"]
    logged = trainer.state.log_history[0]
    for key in ("backbone_loss", "mtp_loss", "confidence_loss", "divergence_backbone", "divergence_mtp",
                "alpha_mean", "mean_confidence", "rollout_commit_rate", "rollout_length", "rollout_slots"):
        assert key in logged, key
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items()), "the teacher is frozen"


def test_lm_heads_never_see_more_than_a_chunk():
    """Memory stays bounded at long context: both LM heads are applied to at most `chunk_size` rows at a time."""
    student, teacher = matched_student_and_teacher()
    calls = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
             for m in (student.lm_head, teacher.lm_head)]
    ids = torch.tensor([[5, 6] + [7, 8, 9, P] * 10])
    labels = torch.where(ids == P, torch.tensor(-100), ids)
    labels[:, :2] = -100
    try:
        with torch.no_grad():
            opd_loss(student, teacher, ids, torch.ones_like(ids), labels, divergence="full", chunk_size=4)
    finally:
        for h in hooks:
            h.remove()
    assert calls and max(calls) <= 4 and sum(calls) >= 2 * 20  # ~20 supervised slots, student + teacher


@pytest.mark.parametrize("seq_kd", [False, True])
def test_off_policy_steps_use_dataset_or_teacher_text(tmp_path, seq_kd):
    """lmbda=0: the on-policy switch never rolls out the student; the rows come from the dataset responses, or from the
    teacher's own generations with seq_kd (laid out with the parity rules)."""
    from transformers_pipo import PipoOPDConfig, PipoOPDTrainer
    from pipo_task import pattern_pipo

    teacher = train_pattern_teacher(steps=5)
    args = PipoOPDConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, lmbda=0.0, seq_kd=seq_kd,
        max_new_tokens=5, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1,
    )
    trainer = PipoOPDTrainer(model=pattern_pipo(seed=2), teacher_model=teacher, args=args,
                             train_dataset=pattern_records(2, seed=7), processing_class=pad_tokenizer())
    seen = []
    original = trainer._opd_loss
    trainer._opd_loss = lambda student, inputs: (seen.append(inputs["input_ids"].clone()), original(student, inputs))[1]
    trainer.train()
    logged = trainer.state.log_history[0]
    assert "rollout_commit_rate" not in logged and "divergence_backbone" in logged
    ids = seen[0]
    assert ids.shape[1] % 2 == 0
    if not seq_kd:
        expected = PipoDataCollator(pad_token_id=P, max_pad_ratio=0.0)(pattern_records(2, seed=7))["input_ids"]
        assert sorted(map(tuple, ids.tolist())) == sorted(map(tuple, expected.tolist()))
    else:
        assert int((ids != P).sum()) > int(sum(len(r["prompt_ids"]) for r in pattern_records(2, seed=7)))


# ----------------------------------------------------------------------------------------------------------------------
# A teacher whose vocabulary is a prefix of the student's (from_backbone appended the PAD)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "topk", "sampled"])
def test_a_teacher_one_row_short_gives_the_same_loss(mode):
    """The PAD row is masked in both distributions, so a teacher without it (the backbone before from_backbone added
    the PAD) must give exactly the loss of the same teacher with a PAD row appended."""
    torch.manual_seed(0)
    student = PipoForCausalLM.from_backbone(
        AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3")), pad_token_id=P
    ).eval()
    torch.manual_seed(1)
    full = AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3")).eval()  # 128 rows, PAD row included
    short = AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3", vocab_size=P)).eval()  # 127 rows
    with torch.no_grad():
        state = {k: v[:P] if v.shape[:1] == (P + 1,) else v for k, v in full.state_dict().items()}
        short.load_state_dict(state)
    ids = torch.tensor([[5, 6, 7, P, 8, 9, 10, P, 11, 12, 13, 14]])
    mask = torch.ones_like(ids)
    labels = torch.where((ids == P) | (torch.arange(12) < 4), torch.tensor(-100), ids)
    results = []
    for teacher in (full, short):
        with torch.no_grad():
            out = opd_loss(student, teacher, ids, mask, labels, divergence=mode,
                           generator=torch.Generator().manual_seed(0))
        results.append(out)
    assert torch.isfinite(results[1].loss)
    torch.testing.assert_close(results[1].loss, results[0].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1].backbone_divergence, results[0].backbone_divergence, equal_nan=True)


def test_teacher_vocabulary_check_accepts_a_prefix_and_refuses_the_rest():
    from transformers_pipo.training.losses import teacher_logits_fn
    from transformers_pipo.training.opd import check_teacher_vocabulary

    student = PipoForCausalLM.from_backbone(
        AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3")), pad_token_id=P
    )
    short = AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3", vocab_size=P))
    check_teacher_vocabulary(student, short)  # a prefix: accepted
    logits = teacher_logits_fn(short, vocab_size=P + 1)(torch.zeros(2, 32))
    assert logits.shape == (2, P + 1) and torch.isneginf(logits[:, P]).all() and torch.isfinite(logits[:, :P]).all()
    big = AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3", vocab_size=200))
    with pytest.raises(ValueError, match="200 vocabulary rows but the student only 128.*use the student's tokenizer"):
        check_teacher_vocabulary(student, big)
