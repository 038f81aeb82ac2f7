"""PIPO generation: equivalence with an uncached oracle, batching, sampling controls, streamers, pipeline, edge cases."""

from __future__ import annotations

import io
import math
import threading
from contextlib import redirect_stdout

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, TextIteratorStreamer, TextStreamer, pipeline

from conftest import EOS_ID, FAMILIES, PAD_ID, make_tokenizer, tiny_pipo
from pipo_oracle import decode_mismatches, oracle_cases, oracle_generate, oracle_prompts, wiring_sensitive_pipo


@pytest.mark.parametrize("tau", [-1.0, 0.5, 1.0])
def test_matches_uncached_oracle(family, tau):
    """Greedy `generate` equals the uncached oracle, on a model whose heads make every wiring matter (see
    pipo_oracle.sensitise; tests/test_generation_faults.py shows this comparison catching injected faults)."""
    model = wiring_sensitive_pipo(family)
    cases = oracle_cases(model, oracle_prompts(20), tau)
    mismatches = decode_mismatches(model, cases, tau)
    assert not mismatches, mismatches[:3]


def test_gate_decisions_vary_at_mid_threshold(family):
    """At τ=0.5 the oracle models' confidence heads must both commit and reject, or the oracle test is vacuous."""
    model = wiring_sensitive_pipo(family)
    prompts = torch.randint(3, PAD_ID, (6, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompts, max_new_tokens=12, do_sample=False, pipo_confidence_threshold=0.5,
                         return_dict_in_generate=True, eos_token_id=None)
    token2_slots = out.pipo_slot_ids[:, 1::2]
    assert bool((token2_slots == PAD_ID).any()) and bool((out.committed_drafts > 0).any())


def test_self_consistency_with_forward(family):
    """Teacher-forcing the produced slots reproduces every token1 and token2 as argmax of logits / mtp_logits."""
    model = wiring_sensitive_pipo(family, seed=3)
    prompt = torch.randint(3, PAD_ID, (1, 7), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, max_new_tokens=14, do_sample=False, pipo_confidence_threshold=-1,
                         return_dict_in_generate=True, eos_token_id=None)
    slots = out.pipo_slot_ids[0].tolist()
    assert len(slots) == 14 and PAD_ID not in slots
    sequence = out.pipo_prompt_ids[0].tolist() + slots
    forward = model(torch.tensor([sequence]))
    logits = forward.logits[0].clone()
    mtp_logits = forward.mtp_logits[0].clone()
    logits[:, PAD_ID] = -math.inf
    mtp_logits[:, PAD_ID] = -math.inf
    first = len(out.pipo_prompt_ids[0]) // 2 - 1  # latent whose hidden produced the prefill pair
    for k in range(7):
        j = first + k
        assert int(logits[j].argmax()) == sequence[2 * j + 2]
        assert int(mtp_logits[j].argmax()) == sequence[2 * j + 3]


@pytest.mark.parametrize("tau", [-1.0, 0.5, 1.0])
def test_left_padded_batch_equals_single(family, tau):
    model = wiring_sensitive_pipo(family)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, PAD_ID, (n,), generator=gen).tolist() for n in (1, 2, 3, 4, 5, 8, 9, 12)]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, eos_token_id=EOS_ID,
                           pipo_confidence_threshold=tau)
    assert torch.equal(batch[:, :width], ids)
    for row, prompt in enumerate(prompts):
        single = model.generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=False, eos_token_id=EOS_ID,
                                pipo_confidence_threshold=tau)[0, len(prompt):].tolist()
        tail = batch[row, width:].tolist()
        assert tail[: len(single)] == single
        assert all(t == PAD_ID for t in tail[len(single):])  # finished rows are right-padded with pad_token_id


def test_max_new_tokens_is_exact_in_real_tokens():
    model = tiny_pipo("qwen3")
    prompt = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, max_new_tokens=0)  # transformers' own validation: nothing to generate
    for n in (1, 2, 3, 7, 10):
        for tau in (-1.0, 0.5, 1.0):
            out = model.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pipo_confidence_threshold=tau, return_dict_in_generate=True)
            assert out.sequences.shape[1] == 3 + n, (n, tau)
            assert PAD_ID not in out.sequences[0, 3:].tolist()
            if n:
                assert int(out.decode_steps[0]) == int(out.backbone_forwards)
                real_slots = out.pipo_slot_ids[0, : int(out.pipo_slot_lengths[0])]
                assert int((real_slots != PAD_ID).sum()) == n


def test_stats_are_consistent():
    model = tiny_pipo("mistral")
    prompts = torch.randint(3, PAD_ID, (3, 6), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompts, max_new_tokens=15, do_sample=False, eos_token_id=None,
                         pipo_confidence_threshold=0.5, return_dict_in_generate=True, output_scores=True,
                         output_logits=True)
    for b in range(3):
        slots = out.pipo_slot_ids[b, : int(out.pipo_slot_lengths[b])]
        token2 = slots[1::2]
        assert int(out.committed_drafts[b]) == int((token2 != PAD_ID).sum())
        assert int(out.decode_steps[b]) == math.ceil(len(slots) / 2)
        assert 0.0 < float(out.mean_confidence[b]) < 1.0
    assert len(out.scores) == 15 and len(out.logits) == 15
    generated = out.sequences[:, 6:]
    for k, scores in enumerate(out.scores):
        assert torch.equal(scores.argmax(-1), generated[:, k])
    assert out.cache.get_seq_length() == int(out.backbone_forwards) + 2  # 3 prompt latents + steps - 1
    assert torch.allclose(out.commit_rate, out.committed_drafts / out.decode_steps)


def test_tau_one_skips_mtp_entirely():
    model = tiny_pipo("llama")
    calls = []
    handle = model.mtp.register_forward_hook(lambda *a: calls.append(1))
    out = model.generate(torch.tensor([[4, 5, 6, 7]]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                         pipo_confidence_threshold=1.0, return_dict_in_generate=True)
    handle.remove()
    assert not calls
    assert out.pipo_slot_ids[0, 1::2].eq(PAD_ID).all() and int(out.committed_drafts[0]) == 0
    assert math.isnan(float(out.mean_confidence[0]))


def test_eos_at_prefill_as_token1_discards_token2():
    model = tiny_pipo("qwen2")
    prompt = torch.tensor([[9, 10, 11, 12, 13]])
    first = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None, pipo_confidence_threshold=-1,
                           return_dict_in_generate=True)
    token1, token2 = first.pipo_slot_ids[0, :2].tolist()
    stopped = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=token1,
                             pipo_confidence_threshold=-1, return_dict_in_generate=True)
    assert stopped.sequences[0, 5:].tolist() == [token1]
    assert int(stopped.pipo_slot_lengths[0]) == 1 and int(stopped.committed_drafts[0]) == 0
    if token2 != token1:
        on_draft = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=token2,
                                  pipo_confidence_threshold=-1)
        assert on_draft[0, 5:].tolist() == [token1, token2]


def test_eos_list_and_min_new_tokens():
    model = tiny_pipo("qwen3")
    prompt = torch.tensor([[9, 10, 11]])
    free = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pipo_confidence_threshold=-1)
    tokens = free[0, 3:].tolist()
    stop_at = tokens[4]
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=[EOS_ID, stop_at],
                         pipo_confidence_threshold=-1)
    assert out[0, 3:].tolist() == tokens[: tokens.index(stop_at) + 1]
    # min_new_tokens forbids that EOS until 6 real tokens exist, per row and exactly.
    out = model.generate(prompt, max_new_tokens=10, min_new_tokens=6, do_sample=False, eos_token_id=stop_at,
                         pipo_confidence_threshold=-1)
    generated = out[0, 3:].tolist()
    assert stop_at not in generated[:6]


class _RecordingProcessor(LogitsProcessor):
    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, scores):
        self.calls.append(input_ids.clone())
        return scores


def test_processors_see_real_tokens_only_and_pad_is_never_emitted():
    model = tiny_pipo("llama")
    with torch.no_grad():
        model.lm_head.weight[PAD_ID] = model.lm_head.weight[PAD_ID] * 0 + 5.0  # PAD dominates raw logits
    prompt = torch.tensor([[3, 4, 5, 6, 7]])
    assert int(model(prompt).logits[0, -1].argmax()) == PAD_ID
    recorder = _RecordingProcessor()
    out = model.generate(prompt, max_new_tokens=9, do_sample=False, eos_token_id=None, pipo_confidence_threshold=0.5,
                         logits_processor=LogitsProcessorList([recorder]), return_dict_in_generate=True)
    generated = out.sequences[0, 5:].tolist()
    assert PAD_ID not in generated and len(generated) == 9
    history = prompt[0].tolist()
    for call in recorder.calls:
        assert call[0].tolist() == (history + generated)[: call.shape[1]]
    # Repetition penalty counts real tokens only: compare against the stock processor on the real history.
    penalised = model.generate(prompt, max_new_tokens=9, do_sample=False, eos_token_id=None,
                               pipo_confidence_threshold=-1, repetition_penalty=5.0)
    assert PAD_ID not in penalised[0, 5:].tolist()


def test_sampling_is_seeded_and_uses_processors():
    model = tiny_pipo("qwen3")
    prompt = torch.tensor([[5, 6, 7, 8]])
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, min_p=0.01,
                  eos_token_id=None, pipo_confidence_threshold=0.5)
    torch.manual_seed(11)
    a = model.generate(prompt, **kwargs)
    torch.manual_seed(11)
    b = model.generate(prompt, **kwargs)
    assert torch.equal(a, b)
    torch.manual_seed(11)
    top1 = model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=1, eos_token_id=None,
                          pipo_confidence_threshold=0.5)
    greedy = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pipo_confidence_threshold=0.5)
    assert torch.equal(top1, greedy)


def test_num_return_sequences_expands_rows():
    model = tiny_pipo("qwen3")
    prompt = torch.tensor([[5, 6, 7]])
    torch.manual_seed(0)
    out = model.generate(prompt, max_new_tokens=6, do_sample=True, num_return_sequences=3, eos_token_id=None)
    assert out.shape == (3, 9)
    assert torch.equal(out[:, :3], prompt.expand(3, -1))


def _byte_level_tokenizer():
    """A byte-level BPE tokenizer trained offline (StopStringCriteria needs byte-level token strings)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    corpus = ["the cat sat on the mat", "a dog ran to the park", "stop here and now"] * 20
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")


def test_stop_strings():
    from transformers import AutoModelForCausalLM

    from conftest import tiny_backbone_config
    from transformers_pipo import PipoForCausalLM

    tok = _byte_level_tokenizer()
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(tiny_backbone_config("llama", vocab_size=len(tok)))
    model = PipoForCausalLM.from_backbone(backbone, tokenizer=tok).eval()
    prompt = tok("the cat", return_tensors="pt").input_ids
    n = prompt.shape[1]
    free = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pipo_confidence_threshold=-1)[0, n:].tolist()
    word = tok.decode(free[5:7])
    assert word.strip(), "need a non-empty stop string"
    stop_at = next(t for t in range(12) if tok.decode(prompt[0].tolist() + free[: t + 1]).endswith(word))
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pipo_confidence_threshold=-1,
                         stop_strings=[word], tokenizer=tok)
    assert out[0, n:].tolist() == free[: stop_at + 1]
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(prompt, max_new_tokens=4, stop_strings=[word])


def test_edge_cases():
    model = wiring_sensitive_pipo("llama")
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(torch.zeros((1, 0), dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match="NaN"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=3, pipo_confidence_threshold=float("nan"))
    with pytest.raises(ValueError, match="Beam search"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=3, num_beams=2)
    with pytest.raises(ValueError, match="assisted"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=3, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="PAD"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=3, eos_token_id=PAD_ID)
    # A prompt of length 1 and prompts containing the PAD id decode and keep the prompt exactly. Without an
    # attention mask transformers infers PAD ids as padding (they leave the model's view); with an explicit mask
    # they are ordinary input tokens (e.g. when continuing from a PIPO slot sequence).
    tau = model.generation_config.pipo_confidence_threshold
    for prompt, explicit_mask in (([9], False), ([9, PAD_ID, 10], False), ([PAD_ID, 4], False),
                                  ([9, PAD_ID, 10], True), ([4, PAD_ID, 6, 7], True)):
        ids = torch.tensor([prompt])
        mask = torch.ones_like(ids) if explicit_mask else None
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None)
        assert out[0, : len(prompt)].tolist() == prompt and out.shape[1] == len(prompt) + 5
        assert PAD_ID not in out[0, len(prompt):].tolist()
        seen = prompt if explicit_mask else [t for t in prompt if t != PAD_ID]
        expected, _ = oracle_generate(model, seen, tau, 5, eos=None)
        assert out[0, len(prompt):].tolist() == expected


def test_threshold_default_comes_from_generation_config():
    model = tiny_pipo("llama")
    assert model.generation_config.pipo_confidence_threshold == 0.95
    model.generation_config.pipo_confidence_threshold = -1
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                         return_dict_in_generate=True)
    # τ = -1 from the config: every draft commits, 8 tokens in 4 steps (at the 0.95 default: 0 commits, 8 steps).
    assert int(out.committed_drafts[0]) == int(out.decode_steps[0]) == 4


def test_token_level_fallback_matches_manual_loop():
    model = tiny_pipo("qwen3")
    prompt = [5, 6, 7]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=None,
                         pipo_decoding=False)
    seq = list(prompt)
    for _ in range(5):
        logits = model(torch.tensor([seq])).logits[0, -1].clone()
        logits[PAD_ID] = -math.inf
        seq.append(int(logits.argmax()))
    assert out[0].tolist() == seq


def _pipo_with_tokenizer(tmp_path):
    tok = make_tokenizer()
    from transformers import AutoModelForCausalLM

    from conftest import tiny_backbone_config
    from transformers_pipo import PipoForCausalLM

    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3"))
    model, tok = PipoForCausalLM.from_backbone(backbone, tokenizer=tok, return_tokenizer=True)
    model.generation_config.pipo_confidence_threshold = -1
    model.eval()
    return model, tok


def test_streamers_receive_each_real_token_once(tmp_path):
    model, tok = _pipo_with_tokenizer(tmp_path)
    prompt = tok("w5 w6 w7", return_tensors="pt")
    expected = model.generate(**prompt, max_new_tokens=9, do_sample=False, eos_token_id=None)
    text = tok.decode(expected[0, 3:], skip_special_tokens=True)

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        model.generate(**prompt, max_new_tokens=9, do_sample=False, eos_token_id=None,
                       streamer=TextStreamer(tok, skip_prompt=True))
    assert buffer.getvalue().strip() == text

    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=30)
    thread = threading.Thread(target=model.generate, kwargs=dict(**prompt, max_new_tokens=9, do_sample=False,
                                                                 eos_token_id=None, streamer=streamer))
    thread.start()
    pieces = list(streamer)  # ends only if end() is called
    thread.join()
    assert "".join(pieces).strip() == text
    assert "<|pipo_pad|>" not in "".join(pieces)


def test_pipeline_string_batch_and_chat(tmp_path):
    model, tok = _pipo_with_tokenizer(tmp_path)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    pipe = pipeline("text-generation", model=str(tmp_path), tokenizer=str(tmp_path))
    single = pipe("w5 w6 w7", max_new_tokens=4, return_full_text=False)
    direct = model.generate(**tok("w5 w6 w7", return_tensors="pt"), max_new_tokens=4)
    assert single[0]["generated_text"].strip() == tok.decode(direct[0, 3:], skip_special_tokens=True).strip()
    batch = pipe(["w5 w6 w7", "w9 w10", "w11"], max_new_tokens=4, batch_size=3, return_full_text=False)
    assert len(batch) == 3 and all(len(r[0]["generated_text"].split()) == 4 for r in batch)
    chat = pipe([{"role": "user", "content": "w20 w21"}], max_new_tokens=4)
    reply = chat[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and len(reply["content"].split()) == 4
    # generation_config.json keeps PIPO's defaults, so the pipeline does not switch sampling on.
    assert pipe.model.generation_config.do_sample is False
    assert pipe.model.generation_config.pipo_confidence_threshold == -1


@pytest.mark.parametrize("fam", FAMILIES)
def test_generate_under_no_grad_free_inference(fam):
    """generate leaves no autograd graph and works for every family with sampling: the returned caches (the tensors
    the decode loop computed) and the scores/logits are detached."""
    model = tiny_pipo(fam)
    torch.manual_seed(0)
    out = model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=5, do_sample=True, eos_token_id=None,
                         pipo_confidence_threshold=0.5, return_dict_in_generate=True, output_scores=True,
                         output_logits=True)
    assert out.sequences.shape == (1, 8)
    cached = [t for cache in (out.cache, out.mtp_cache) for layer in cache.layers for t in vars(layer).values()
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    floats = [*cached, *out.scores, *out.logits, out.mean_confidence]
    assert len(cached) >= 4 and not any(t.requires_grad for t in floats)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_grad_mode_of_returned_tensors(cache_implementation):
    """Eager decoding over dynamic caches runs under inference mode (DESIGN §3.8): only the two returned caches are
    inference tensors; sequences, scores and statistics stay ordinary tensors that can enter autograd (OPD trains on
    generated sequences). Static caches outlive the call (kept and reset in place), so that path keeps no_grad."""
    model = tiny_pipo("qwen3")
    out = model.generate(torch.tensor([[4, 5, 6, 7]]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                         pipo_confidence_threshold=0.5, return_dict_in_generate=True, output_scores=True,
                         cache_implementation=cache_implementation)
    dynamic = cache_implementation is None
    assert out.cache.layers[0].keys.is_inference() == dynamic
    assert out.mtp_cache.layers[0].keys.is_inference() == dynamic
    plain = [out.sequences, *out.scores, out.pipo_slot_ids, out.committed_drafts, out.mean_confidence]
    assert not any(t.is_inference() for t in plain)
    loss = model(input_ids=out.sequences[:, :10], labels=out.sequences[:, :10]).loss
    loss.backward()  # would raise "Inference tensors cannot be saved for backward" on inference-mode ids
    assert model.lm_head.weight.grad is not None
    # A second eager call on the same model after the static one, and the reverse, both still work.
    again = model.generate(torch.tensor([[4, 5, 6, 7]]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                           pipo_confidence_threshold=0.5)
    assert torch.equal(again, out.sequences)


def test_plain_and_dict_calls_emit_the_same_tokens():
    """Plain calls skip the raw-slot and statistics upkeep (DESIGN §3.8); the tokens must not depend on it."""
    model = wiring_sensitive_pipo("llama")
    prompts = torch.tensor([[3, 9, 4, 5, 6], [0, 7, 8, 2, 11]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    kw = dict(attention_mask=mask, max_new_tokens=9, do_sample=False, eos_token_id=5, pipo_confidence_threshold=0.5)
    plain = model.generate(prompts, **kw)
    full = model.generate(prompts, return_dict_in_generate=True, **kw)
    assert torch.equal(plain, full.sequences)
    assert 0 < int(full.committed_drafts.sum()) < int(full.decode_steps.sum())  # the gate both commits and rejects
