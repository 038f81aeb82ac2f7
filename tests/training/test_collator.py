"""PipoDataCollator and record loading: pair layout invariants (property tests), augmentation modes, error reports."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BOS_ID, EOS_ID, PAD_ID
from pipo_task import pad_tokenizer
from transformers_pipo.training import PipoDataCollator, PipoDataError, augment_response, load_records
from transformers_pipo.training.data import encode_record

PREFIX = [98, 99]  # a fixed response prefix, like <think>\n

token = st.integers(min_value=3, max_value=97)


@st.composite
def batches(draw):
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        prompt = draw(st.lists(token, min_size=1, max_size=9))
        response = draw(st.lists(token, min_size=1, max_size=17))
        if draw(st.booleans()):
            response = PREFIX + response
        rows.append({"prompt_ids": prompt, "response_ids": response})
    return rows


def check_row(ids, labels, mask, prompt, response, prefix):
    """The invariants every collated row must satisfy; returns the number of PADs inside the response."""
    n = int(mask.sum())
    assert n % 2 == 0 and bool(mask[:n].all()) and not bool(mask[n:].any()), "rows are whole pairs, right-padded"
    ids, labels = ids[:n].tolist(), labels[:n].tolist()
    pads = [i for i, t in enumerate(ids) if t == PAD_ID]
    assert all(i % 2 == 1 for i in pads), f"PAD in a token1 slot: {ids}"
    if prefix and response[: len(prefix)] == prefix:
        prompt, response = prompt + prefix, response[len(prefix):]
    # The prompt (with the masked prefix) is copied unchanged and closed on an even boundary.
    boundary = len(prompt) + len(prompt) % 2
    assert ids[: len(prompt)] == prompt
    if len(prompt) % 2:
        assert ids[len(prompt)] == PAD_ID
    # Labels are -100 exactly on prompt/prefix/PAD positions and equal to the ids elsewhere.
    for i, (t, y) in enumerate(zip(ids, labels)):
        if i < boundary or t == PAD_ID:
            assert y == -100
        else:
            assert y == t
    first_label = next(i for i, y in enumerate(labels) if y != -100)
    assert first_label == boundary and boundary % 2 == 0, "a pair straddles the prompt/response boundary"
    # No response token lost, duplicated or reordered.
    assert [t for t in ids[boundary:] if t != PAD_ID] == response
    return sum(1 for i in pads if i >= boundary)


@settings(max_examples=150, deadline=None)
@given(
    rows=batches(),
    ratio=st.floats(0.0, 1.0),
    mode=st.sampled_from(["split", "shift", "none"]),
    min_split=st.integers(0, 2),
    mask_prefix=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_collator_invariants(rows, ratio, mode, min_split, mask_prefix, seed):
    collator = PipoDataCollator(
        pad_token_id=PAD_ID,
        max_pad_ratio=ratio,
        pad_augmentation=mode,
        min_split_pairs=min_split,
        mask_response_prefix=PREFIX if mask_prefix else None,
        seed=seed,
    )
    batch = collator(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] % 2 == 0
    r = collator.last_ratio
    assert 0.0 <= r <= ratio
    for b, row in enumerate(rows):
        inserted = check_row(
            batch["input_ids"][b], batch["labels"][b], batch["attention_mask"][b], row["prompt_ids"],
            row["response_ids"], PREFIX if mask_prefix else None,
        )
        response = row["response_ids"]
        if mask_prefix and response[:2] == PREFIX:
            response = response[2:]
        n_full = len(response) // 2
        expected = 0 if mode == "none" or n_full == 0 else min(n_full, max(min_split, round(n_full * r)))
        tail = len(response) % 2
        if mode == "split":
            assert inserted == 2 * expected + tail
        elif mode == "shift":
            # each rejected draft adds one PAD; one more closes an odd tail (parity fixes which)
            assert inserted == expected + (expected + len(response)) % 2
        else:
            assert inserted == tail


@settings(max_examples=60, deadline=None)
@given(response=st.lists(token, min_size=0, max_size=21), ratio=st.floats(0, 1), seed=st.integers(0, 1000),
       mode=st.sampled_from(["split", "shift"]))
def test_augment_response_roundtrip(response, ratio, seed, mode):
    out = augment_response(response, PAD_ID, ratio, mode, rng=random.Random(seed))
    assert len(out) % 2 == 0
    assert all(i % 2 == 1 for i, t in enumerate(out) if t == PAD_ID)
    assert [t for t in out if t != PAD_ID] == response


def test_split_and_shift_layouts_exact():
    r = [10, 11, 12, 13, 14, 15]
    # Split every pair: (a, PAD, b, PAD) each.
    assert augment_response(r, PAD_ID, 1.0, "split") == [
        10, PAD_ID, 11, PAD_ID, 12, PAD_ID, 13, PAD_ID, 14, PAD_ID, 15, PAD_ID]
    # Shift: rejecting a draft re-pairs everything after it (inference-style parity shift).
    # The exact form for a rejection at the first pair:
    assert augment_response(r, PAD_ID, 1 / 3, "shift", rng=_FixedRng([0])) == [
        10, PAD_ID, 11, 12, 13, 14, 15, PAD_ID]
    assert augment_response(r, PAD_ID, 1 / 3, "split", rng=_FixedRng([1])) == [10, 11, 12, PAD_ID, 13, PAD_ID, 14, 15]


class _FixedRng:
    def __init__(self, chosen):
        self.chosen = chosen

    def sample(self, population, k):
        return self.chosen[:k]


def test_zero_ratio_means_no_augmentation_and_reference_quirk_is_opt_in():
    rows = [{"prompt_ids": [5, 6], "response_ids": [10, 11, 12, 13]}]
    plain = PipoDataCollator(pad_token_id=PAD_ID, max_pad_ratio=0.0)(rows)
    assert plain["input_ids"][0].tolist() == [5, 6, 10, 11, 12, 13]
    quirk = PipoDataCollator(pad_token_id=PAD_ID, max_pad_ratio=0.0, min_split_pairs=1, seed=0)(rows)
    assert quirk["input_ids"][0].tolist().count(PAD_ID) == 2  # one pair split even at r = 0 (reference behaviour)


def test_prompt_parity_pad_batch_padding_and_truncation():
    rows = [{"prompt_ids": [5, 6, 7], "response_ids": [10, 11, 12]}, {"prompt_ids": [5], "response_ids": [10]}]
    batch = PipoDataCollator(pad_token_id=PAD_ID, max_pad_ratio=0.0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, PAD_ID, 10, 11, 12, PAD_ID], [5, PAD_ID, 10, PAD_ID] + [PAD_ID] * 4]
    assert batch["labels"].tolist() == [[-100, -100, -100, -100, 10, 11, 12, -100], [-100, -100, 10, -100] + [-100] * 4]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 4 + [0] * 4]
    short = PipoDataCollator(pad_token_id=PAD_ID, max_pad_ratio=0.0, max_length=7)(rows[:1])
    assert short["input_ids"].tolist() == [[5, 6, 7, PAD_ID, 10, 11]]
    wide = PipoDataCollator(pad_token_id=PAD_ID, max_pad_ratio=0.0, pad_to_multiple_of=8)(rows[1:])
    assert wide["input_ids"].shape == (1, 8)
    prompts = PipoDataCollator(pad_token_id=PAD_ID, max_pad_ratio=0.0, return_prompts=True)(rows)
    assert prompts["prompts"].tolist() == [[5, 6, 7], [PAD_ID, PAD_ID, 5]]
    assert prompts["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_response_prefix_text_is_masked_like_the_prompt():
    tok = pad_tokenizer()
    collator = PipoDataCollator(tokenizer=tok, max_pad_ratio=0.0, mask_response_prefix="w98 w99")
    batch = collator([{"prompt_ids": [5, 6, 7], "response_ids": [98, 99, 10, 11]}])
    # prompt (3) + prefix (2) = 5 tokens -> PAD -> response starts at 6
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 98, 99, PAD_ID, 10, 11]
    assert batch["labels"][0].tolist() == [-100] * 6 + [10, 11]


def test_records_from_messages_and_prompt_response():
    tok = pad_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}w4 {% endif %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}w4 {% endif %}"
    )
    rec = encode_record({"messages": [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7 w8"}]},
                        tok)
    assert rec == {"prompt_ids": [5, 6, 4], "response_ids": [7, 8]}
    rec = encode_record({"prompt": "w5 w6", "response": "w7"}, tok)
    assert rec == {"prompt_ids": [5, 6], "response_ids": [7, EOS_ID]}
    rec = encode_record({"prompt": [{"role": "user", "content": "w5"}]}, tok, require_response=False)
    assert rec == {"prompt_ids": [5, 4], "response_ids": []}
    # raw records go straight into the collator
    batch = PipoDataCollator(tokenizer=tok, max_pad_ratio=0.0)([{"prompt": "w5 w6", "completion": "w7 w8"}])
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, EOS_ID, PAD_ID]


def test_bad_records_are_reported_with_line_numbers(tmp_path):
    tok = pad_tokenizer()
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"prompt": "w5 w6", "response": "w7"}),
        "{not json",
        json.dumps({"text": "w5"}),
        "",
        json.dumps({"prompt": "w5"}),
        json.dumps({"prompt": "w5 <pad>", "response": "w6"}),
        json.dumps({"prompt": "w5", "response": "w6 w7"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PipoDataError) as err:
        load_records(path, tok, pad_token_id=PAD_ID)
    assert "line 2: invalid JSON" in str(err.value)
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    with pytest.raises(PipoDataError) as err:
        load_records(path, tok, pad_token_id=PAD_ID)
    message = str(err.value)
    assert "3 bad record(s)" in message
    assert "line 2: record has none of 'messages', 'prompt'" in message
    assert "line 4: the record has no response" in message
    assert "line 5: the record contains the PIPO PAD token" in message
    good = tmp_path / "good.jsonl"
    good.write_text(lines[0] + "\n\n" + lines[6] + "\n")
    records = load_records(good, tok, pad_token_id=PAD_ID)
    assert [r["line"] for r in records] == [1, 3]
    assert records[1]["response_ids"] == [6, 7, EOS_ID]
    # prompt-only files are fine for on-policy distillation
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "w5 w6"}) + "\n")
    assert load_records(prompts, tok, require_response=False)[0]["response_ids"] == []
    with pytest.raises(PipoDataError, match="line 1: the record has no response"):
        load_records(prompts, tok)


def test_collator_errors_name_the_problem():
    with pytest.raises(ValueError, match="pad_token_id"):
        PipoDataCollator()
    with pytest.raises(ValueError, match="pad_augmentation"):
        PipoDataCollator(pad_token_id=PAD_ID, pad_augmentation="random")
    with pytest.raises(ValueError, match="max_pad_ratio"):
        PipoDataCollator(pad_token_id=PAD_ID, max_pad_ratio=1.5)
    collator = PipoDataCollator(pad_token_id=PAD_ID)
    with pytest.raises(PipoDataError, match=r"empty response_ids \(line 7\)"):
        collator([{"prompt_ids": [5], "response_ids": [], "line": 7}])
    with pytest.raises(PipoDataError, match="PAD"):
        collator([{"prompt_ids": [5, PAD_ID], "response_ids": [6]}])


def test_seeded_collator_is_reproducible():
    rows = [{"prompt_ids": [BOS_ID, 5], "response_ids": list(range(10, 40))}]
    a = PipoDataCollator(pad_token_id=PAD_ID, max_pad_ratio=0.5, seed=3)
    b = PipoDataCollator(pad_token_id=PAD_ID, max_pad_ratio=0.5, seed=3)
    for _ in range(3):
        assert torch.equal(a(rows)["input_ids"], b(rows)["input_ids"])
    # Collators pickle (spawned dataloader workers), with a private or the global RNG.
    import pickle

    assert torch.equal(pickle.loads(pickle.dumps(a))(rows)["input_ids"], a(rows)["input_ids"])
    pickle.loads(pickle.dumps(PipoDataCollator(pad_token_id=PAD_ID)))(rows)
