"""Fault injection: the oracle comparison must catch every decoder wiring fault in every backbone family.

Each fault is injected into the decode path only, by wrapping a public model method that `generate` calls (the
oracle, computed first on the clean model, runs the training forward). The same comparison the oracle tests make
(`decode_mismatches`) must then report a mismatch; the clean model must match, so a fault that stops taking effect
fails the test too.

- `wrong_token1`: the MTP is fed the previous decode step's token1 (the first token of the pair just folded).
- `swapped_pair`: the next input pair is folded as (token2, token1).
- `backbone_position`: the backbone's decode position is one too far.
- `mtp_position`: the MTP's decode position is one too far.
- `negated_confidence`: the gate reads the negated confidence logit.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

from conftest import FAMILIES
from pipo_oracle import decode_mismatches, oracle_cases, oracle_prompts, wiring_sensitive_pipo, wiring_sensitivity

# Few, short prompts keep this fast; every fault is still seen by every family (asserted below).
N_PROMPTS = 6


def _owner(model, name: str):
    """The object whose `name` the decoder reaches: a PIPO base model under `model.model` when it defines the
    method (the innermost definition, so a delegating outer method is not faulted twice), else `model`."""
    inner = getattr(model, "model", None)
    if inner is not None and callable(getattr(type(inner), name, None)):
        return inner
    return model


@contextlib.contextmanager
def _wrapped(model, name: str, rewrite):
    """Replace `owner.name` by `rewrite(original, arguments)` where `arguments` are the call's bound arguments by
    name (positional or keyword calls alike); the original method is restored on exit."""
    owner = _owner(model, name)
    original = getattr(owner, name)
    signature = inspect.signature(original)

    def patched(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return rewrite(original, bound.arguments)

    setattr(owner, name, patched)
    try:
        yield
    finally:
        delattr(owner, name)


def wrong_token1(model):
    previous = {}

    def rewrite(original, a):
        current = a["token1"]
        a["token1"] = previous.get("token1", current)  # the first decode step keeps its token1
        previous["token1"] = current
        return original(**a)

    return _wrapped(model, "mtp_step", rewrite)


def swapped_pair(model):
    def rewrite(original, a):
        ids = a["input_ids"]
        if ids.shape[1] == 2:  # one pair: the pair folded at a decode step
            a["input_ids"] = ids.flip(-1)
        return original(**a)

    return _wrapped(model, "embed_pairs", rewrite)


def backbone_position(model):
    def rewrite(original, a):
        if a["latents"].shape[1] == 1:  # one latent: a decode step
            a["position_ids"] = a["position_ids"] + 1
        return original(**a)

    return _wrapped(model, "run_backbone", rewrite)


def mtp_position(model):
    def rewrite(original, a):
        a["position_ids"] = a["position_ids"] + 1
        return original(**a)

    return _wrapped(model, "mtp_step", rewrite)


def negated_confidence(model):
    return _wrapped(model, "confidence_logits", lambda original, a: -original(**a))


# fault -> the threshold that exposes it: τ < 0 commits every draft (the MTP's output is always used); the gate only
# decides anything at a threshold between 0 and 1.
FAULTS = {
    "wrong_token1": (wrong_token1, -1.0),
    "swapped_pair": (swapped_pair, -1.0),
    "backbone_position": (backbone_position, -1.0),
    "mtp_position": (mtp_position, -1.0),
    "negated_confidence": (negated_confidence, 0.5),
}
STATIC_FAMILIES = [f for f in FAMILIES if f != "qwen3_5"]  # Qwen3.5 falls back to a dynamic cache


@pytest.fixture(scope="module")
def clean_cases():
    """`get(family, path)`: the wiring-sensitive model and its oracle outputs at every threshold the faults use,
    after checking that the clean decoder on `path` ("dynamic" or "static" caches) matches them all."""
    models, checked = {}, set()

    def get(family: str, path: str = "dynamic"):
        if family not in models:
            model = wiring_sensitive_pipo(family)
            prompts = oracle_prompts(N_PROMPTS)
            models[family] = (model, {tau: oracle_cases(model, prompts, tau) for _, tau in FAULTS.values()})
        model, cases = models[family]
        if (family, path) not in checked:
            for tau, rows in cases.items():
                assert decode_mismatches(model, rows, tau, **PATHS[path]) == [], (family, path, tau)
            checked.add((family, path))
        return model, cases

    return get


PATHS = {"dynamic": {}, "static": {"cache_implementation": "static"}}


def test_test_models_make_pair_order_and_token1_matter(family):
    sensitivity = wiring_sensitivity(wiring_sensitive_pipo(family))
    assert sensitivity["compressor_order"] > 0.3, sensitivity
    assert sensitivity["mtp_token1"] > 0.3, sensitivity


@pytest.mark.parametrize("fault", list(FAULTS))
def test_oracle_comparison_catches_the_fault(family, fault, clean_cases):
    model, cases = clean_cases(family)  # the clean decoder matches the oracle
    inject, tau = FAULTS[fault]
    with inject(model):
        assert decode_mismatches(model, cases[tau], tau), f"{fault} went unnoticed for {family}"
    assert decode_mismatches(model, cases[tau][:2], tau) == []  # the fault is gone again


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("static_family", STATIC_FAMILIES)
def test_oracle_comparison_catches_the_fault_with_static_caches(static_family, fault, clean_cases):
    model, cases = clean_cases(static_family, "static")
    inject, tau = FAULTS[fault]
    with inject(model):
        found = decode_mismatches(model, cases[tau], tau, **PATHS["static"])
    assert found, f"{fault} went unnoticed for {static_family} with static caches"
