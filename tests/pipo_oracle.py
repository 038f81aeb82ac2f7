"""The uncached PIPO decoding oracle, the comparison the generation tests make against it, and tiny models whose
heads make every wiring of the decoder matter.

A tiny model only catches a decoder wiring fault when the fault changes the model's output. Two initialisations of
`from_backbone` hide whole classes of faults: its compressor starts symmetric in the pair (`SiLU(a) + SiLU(b)` for
`mlp`, `a + b` for `linear`), so a decoder that folds (token2, token1) instead of (token1, token2) decodes the same
tokens; and a copied backbone layer behind `fc` can leave the MTP's argmax barely dependent on token1.
Likewise the backbones' small init leaves attention nearly uniform, so a decode position off by one changes
little. `wiring_sensitive_pipo` redraws the projections at fan-in scale, so the oracle comparison sees all of these
faults; tests/test_generation_faults.py proves it by injecting each one.
"""

from __future__ import annotations

import math

import torch

from conftest import EOS_ID, PAD_ID, tiny_pipo

MAX_NEW = 8
QK_GAIN = 2.5


def oracle_generate(model, prompt: list[int], tau: float, max_new: int, eos: int | None = EOS_ID):
    """Deliberately simple PIPO decoding: recompute the full uncached forward for every token.

    Returns the real generated tokens and the raw slot sequence (token1, token2-or-PAD, ...).
    """
    slots = list(prompt) + ([PAD_ID] if len(prompt) % 2 else [])
    n_prompt = len(slots)
    out: list[int] = []
    while len(out) < max_new:
        n_lat = len(slots) // 2
        # Any pair appended after the sequence cannot change latent n_lat-1 (causal), so one forward over
        # slots + (token1, PAD) yields both token1's logits and the MTP output for that token1.
        logits = model(torch.tensor([slots + [PAD_ID, PAD_ID]])).logits[0, n_lat - 1].clone()
        logits[PAD_ID] = -math.inf
        token1 = int(logits.argmax())
        out.append(token1)
        if token1 == eos or len(out) >= max_new:
            slots.append(token1)
            break
        if tau >= 1:
            slots += [token1, PAD_ID]
            continue
        full = model(torch.tensor([slots + [token1, PAD_ID]]))
        confidence = torch.sigmoid(full.confidence_logits[0, n_lat - 1]).item()
        draft_logits = full.mtp_logits[0, n_lat - 1].clone()
        draft_logits[PAD_ID] = -math.inf
        draft = int(draft_logits.argmax())
        if tau < 0 or confidence >= tau:
            out.append(draft)
            slots += [token1, draft]
            if draft == eos:
                break
        else:
            slots += [token1, PAD_ID]
    return out, slots[n_prompt:]


def oracle_prompts(n: int = 20, seed: int = 1234) -> list[list[int]]:
    """`n` random prompts of lengths 1..13 (odd and even)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, PAD_ID, (1 + (i % 13),), generator=gen).tolist() for i in range(n)]


def oracle_cases(model, prompts: list[list[int]], tau: float, max_new: int = MAX_NEW) -> list[tuple]:
    """`(prompt, tokens, slots)` of the oracle for every prompt (compute these on the clean model)."""
    with torch.no_grad():
        return [(prompt, *oracle_generate(model, prompt, tau, max_new)) for prompt in prompts]


def decode_mismatches(model, cases: list[tuple], tau: float, max_new: int = MAX_NEW, **generate_kwargs) -> list:
    """The rows where greedy `model.generate` differs from the oracle in real tokens or raw slots (empty: all match).

    This is the comparison every oracle test makes; `generate_kwargs` select a decode path (e.g. a static cache).
    """
    mismatches = []
    for prompt, expected, expected_slots in cases:
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=EOS_ID,
            pipo_confidence_threshold=tau, return_dict_in_generate=True, **generate_kwargs,
        )
        got = out.sequences[0, len(prompt):].tolist()
        slots = out.pipo_slot_ids[0, : int(out.pipo_slot_lengths[0])].tolist()
        if got != expected or slots != expected_slots:
            mismatches.append((prompt, expected, got, expected_slots, slots))
    return mismatches


@torch.no_grad()
def sensitise(model, seed: int = 0, embedding_std: float = 0.5):
    """Redraw the model's weights at scales under which every decoder wiring changes the output, in place.

    - every projection (backbone, compressor, MTP, confidence head) from N(0, 1/fan_in): the compressor becomes
      asymmetric in the pair; `fc` mixes the normalised token1 embedding and hidden state with weights of the same
      size (from_backbone's `fc` starts as `[0 | I]`: the MTP ignores token1); attention scores become O(1), peaked
      enough for a position shift to change them (at the backbones' 0.02-std init attention is nearly uniform);
      queries and keys get a further gain `QK_GAIN` (through their projections, or the per-head q/k norms where
      the family has them), since a one-position RoPE shift barely moves scores of size 1;
    - the confidence head's output weights centred, so its gate both commits and rejects at τ = 0.5;
    - the token embedding (the tied LM head too) and any position table from N(0, `embedding_std`²), an untied LM
      head from N(0, 1/hidden): at 0.02 std the residual stream forgets the token and position, and greedy
      decoding settles into one short cycle for every prompt, where feeding the previous token1 changes nothing.
    """
    gen = torch.Generator().manual_seed(10_000 + seed)

    def draw(param, std):
        param.copy_((std * torch.randn(param.shape, generator=gen)).to(param.dtype))

    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.endswith(("q_norm", "k_norm")) and isinstance(weight, torch.nn.Parameter):
            weight.add_(QK_GAIN - 1)  # gain QK_GAIN for plain (x·w, w = 1) and zero-centred (x·(1 + w), w = 0) norms
            continue
        if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 2:
            continue
        if module is head:
            if head.weight is not model.get_input_embeddings().weight:
                draw(weight, 1 / math.sqrt(weight.shape[1]))
            continue
        if isinstance(module, torch.nn.Embedding):
            draw(weight, embedding_std)
            continue
        if isinstance(module, torch.nn.Linear):
            fan_in = module.in_features
        elif type(module).__name__ == "Conv1D":  # GPT-2's projections store the weight as [in, out]
            fan_in = weight.shape[0]
        else:
            continue
        draw(weight, (QK_GAIN if name.endswith(("q_proj", "k_proj")) else 1.0) / math.sqrt(fan_in))
        if name.endswith("confidence_head.fc2"):
            weight.sub_(weight.mean())  # cancels the offset of the positive SiLU mean: confidences spread around 0.5
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.nn.Parameter):
            draw(bias, 0.1)
    return model


def wiring_sensitive_pipo(family: str, seed: int = 0, **kwargs):
    """`tiny_pipo(family)` after `sensitise`: the model the oracle tests decode."""
    return sensitise(tiny_pipo(family, seed=seed, **kwargs), seed)


@torch.no_grad()
def wiring_sensitivity(model) -> dict[str, float]:
    """Relative output changes (0 = the decoder could not tell): the compressor under a swapped pair, and the MTP
    under another token1 (same hidden state)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, PAD_ID, (64, 2), generator=gen)
    z = model.embed_pairs(ids)
    z_swapped = model.embed_pairs(ids.flip(-1))
    hidden = torch.randn(64, 1, model.config.hidden_size, generator=gen)
    positions = torch.zeros(64, 1, dtype=torch.long)
    m = model.run_mtp(ids[:, :1], hidden, None, positions)
    m_other = model.run_mtp(ids[:, 1:], hidden, None, positions)
    return {
        "compressor_order": float((z - z_swapped).norm() / z.norm()),
        "mtp_token1": float((m - m_other).norm() / m.norm()),
    }
