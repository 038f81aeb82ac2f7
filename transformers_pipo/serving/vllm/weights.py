"""Checkpoint key layout of a saved PIPO model, as the vLLM plugin reads it (no vLLM import here).

Two layouts are accepted (DESIGN §6.1):

- flat (checkpoints saved before the nested layout): ``model.*`` = backbone body, ``compressor.*``, ``mtp.*``,
  ``confidence_head.*``, ``lm_head.*``;
- nested: ``model.backbone.*``, ``model.compressor.*``, ``model.mtp.*``, ``model.confidence_head.*``, ``lm_head.*``.
"""

from __future__ import annotations

PIPO_HEADS = ("compressor", "mtp", "confidence_head")
COMPONENTS = ("backbone", "lm_head") + PIPO_HEADS


def split_pipo_weight_name(name: str) -> tuple[str, str]:
    """Map one checkpoint key to ``(component, key inside that component)``.

    ``component`` is one of ``COMPONENTS``; for the backbone the key is relative to the backbone body (e.g.
    ``layers.0.self_attn.q_proj.weight``), for the heads relative to the head module (e.g. ``fc.weight`` of ``mtp``).
    Both the flat and the nested layout are accepted; anything else is an error naming the key.
    """
    if name.startswith("lm_head."):
        return "lm_head", name[len("lm_head."):]
    head, _, rest = name.partition(".")
    if head in PIPO_HEADS and rest:
        return head, rest
    if head == "model" and rest:
        inner, _, tail = rest.partition(".")
        if inner == "backbone" and tail:
            return "backbone", tail
        if inner in PIPO_HEADS and tail:
            return inner, tail
        return "backbone", rest
    raise ValueError(
        f"Unexpected PIPO checkpoint key {name!r}: expected lm_head.*, model.* / model.backbone.* (backbone), or "
        f"compressor.* / mtp.* / confidence_head.* (optionally under model.)."
    )


def group_pipo_weights(weights):
    """Split an iterable of ``(key, tensor)`` into ``{component: [(inner key, tensor), ...]}``."""
    groups: dict[str, list] = {c: [] for c in COMPONENTS}
    for name, tensor in weights:
        component, inner = split_pipo_weight_name(name)
        groups[component].append((inner, tensor))
    return groups
