"""A tiny synthetic task for the training tests, plus small shared helpers.

The task is a cyclic pattern A B C {D|E} F G A B C ... (ids 10..16): every transition is deterministic except the
branch after C, which is D or E with probability 1/2. A small PIPO model learns it in seconds on CPU; the branch
gives the confidence head genuinely uncertain drafts (right half of the time) next to certain ones.
"""

from __future__ import annotations

import random

import torch

from conftest import BOS_ID, PAD_ID, make_tokenizer

A, B, C, D, E, F, G = range(10, 17)
SUCCESSORS = {A: (B,), B: (C,), C: (D, E), D: (F,), E: (F,), F: (G,), G: (A,)}
PATTERN_TOKENS = tuple(SUCCESSORS)


def pattern_sequence(rng: random.Random, length: int, start: int | None = None) -> list[int]:
    token = rng.choice(PATTERN_TOKENS) if start is None else start
    out = [token]
    while len(out) < length:
        token = rng.choice(SUCCESSORS[token])
        out.append(token)
    return out


def pattern_records(n: int, seed: int, response_len: tuple[int, int] = (12, 20)) -> list[dict]:
    """Records `{prompt_ids, response_ids}`: prompt = BOS, a marker and 1-5 pattern tokens (both parities), response =
    the pattern's continuation."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        k = rng.randint(1, 5)
        seq = pattern_sequence(rng, k + rng.randint(*response_len))
        records.append({"prompt_ids": [BOS_ID, 5] + seq[:k], "response_ids": seq[k:]})
    return records


def is_legal(previous: int, token: int) -> bool:
    return token in SUCCESSORS.get(previous, ())


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count 1/2): P(score of a positive > score of a negative)."""
    scores, positives = scores.flatten().float(), positives.flatten().bool()
    pos, neg = scores[positives], scores[~positives]
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("AUROC needs both positives and negatives.")
    greater = (pos.unsqueeze(1) > neg.unsqueeze(0)).float().mean()
    ties = (pos.unsqueeze(1) == neg.unsqueeze(0)).float().mean()
    return float(greater + 0.5 * ties)


def pad_tokenizer():
    """The offline word-level tokenizer with `<pad>` added as the PIPO PAD (id PAD_ID)."""
    tok = make_tokenizer()
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tok.pad_token_id == PAD_ID
    return tok


def eval_losses(model, collator, records) -> dict[str, float]:
    """Backbone / MTP / confidence losses of `model` on `records` (no PAD augmentation)."""
    batch = collator(records)
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(**batch, return_logits=False)
    model.train(was)
    return {
        "backbone_loss": float(out.backbone_loss),
        "mtp_loss": float(out.mtp_loss),
        "confidence_loss": float(out.confidence_loss),
    }




def train_pattern_teacher(steps: int = 150, seed: int = 0, family: str = "qwen3"):
    """A token-level causal LM (same vocabulary as the tiny PIPO models) trained on the pattern with plain CE."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_backbone_config

    torch.manual_seed(seed)
    teacher = AutoModelForCausalLM.from_config(tiny_backbone_config(family))
    with torch.no_grad():
        teacher.get_input_embeddings().weight.mul_(EMBED_SCALE)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    teacher.train()
    for _ in range(steps):
        ids = torch.tensor([[BOS_ID, 5] + pattern_sequence(rng, 22) for _ in range(16)])
        labels = ids.clone()
        labels[:, :3] = -100
        loss = teacher(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return teacher.eval()


# Embedding scale of a "pretrained-like" tiny model: with HF's default std of 0.02 and a frozen tied LM head the
# logits stay nearly flat; scaling the embeddings lets a two-layer model express peaked distributions.
EMBED_SCALE = 25.0


def pattern_pipo(seed: int = 0, family: str = "qwen3", **kwargs):
    """A tiny PIPO model with pretrained-like embedding scale (see EMBED_SCALE)."""
    from conftest import tiny_pipo

    model = tiny_pipo(family, seed=seed, **kwargs)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(EMBED_SCALE)
    return model
