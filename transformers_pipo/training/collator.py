"""`PipoDataCollator`: prompt/response records → PIPO training batches (DESIGN §1.2 and §2.2).

Per row:

1. `ids = prompt + response`; a fixed response prefix (e.g. `<think>\\n`) is moved into the prompt when
   `mask_response_prefix` is set and the response starts with it, so it is never trained on and counts as prompt
   for the parity rule, exactly as at inference.
2. An odd prompt gets one PAD appended, so the first response token is a token1 and no pair straddles the
   prompt/response boundary.
3. PAD augmentation of the response (one ratio `r ~ U[0, max_pad_ratio]` per collator call, i.e. per forward pass /
   micro-batch, as in the reference):
   - `"split"` (DESIGN §2.2, the reference): `n = round(r · n_eligible)` of the full response pairs `(a, b)` become
     `(a, PAD), (b, PAD)`; the pairing of every other pair is unchanged;
   - `"shift"` (DESIGN §4.9, what inference produces): at `n` emitted pairs the draft is rejected, giving
     `(a, PAD)` and then re-pairing the rest of the response from `b` on, which shifts its parity;
   - `"none"`.
   `min_split_pairs` (default 0) forces at least that many splits per row; the reference always splits one
   (`min_split_pairs=1`) even when `r ≈ 0` — reproduce it only deliberately.
4. The total length is made even with a trailing PAD; right truncation to `max_length` keeps whole pairs.
5. Labels are the ids (unshifted) on response tokens and -100 on the prompt, the masked prefix and every PAD.

Rows are right-padded with PAD in whole pairs (`attention_mask` 0 there). With `return_prompts=True` the batch also
holds the raw prompts, left-padded, as `prompts` / `prompt_attention_mask` for on-policy rollouts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from ..modeling_pipo import IGNORE_INDEX, align_row
from .data import PipoDataError, encode_record
# Key under which IndexedDataset adds each record's dataset index.
INDEX_KEY = "pipo_index"
PAD_AUGMENTATIONS = ("split", "shift", "none")


def augment_response(
    response: list[int],
    pad_token_id: int,
    ratio: float,
    mode: str = "split",
    min_split_pairs: int = 0,
    rng: random.Random | None = None,
) -> list[int]:
    """Lay a response (starting at an even index) out in pairs, inserting PADs in draft slots as in `mode`.

    The result has even length, every PAD sits at an odd offset, and removing the PADs gives `response` back.
    """
    if mode not in PAD_AUGMENTATIONS:
        raise ValueError(f"pad_augmentation must be one of {PAD_AUGMENTATIONS}, got {mode!r}.")
    if ratio < 0 or ratio > 1:
        raise ValueError(f"PAD ratio must lie in [0, 1], got {ratio}.")
    rng = rng or random
    n_full = len(response) // 2  # pairs with two real tokens before any insertion
    n_pad = 0
    if mode != "none" and n_full > 0:
        n_pad = min(n_full, max(min_split_pairs, int(round(n_full * ratio))))
    out: list[int] = []
    if mode == "shift" and n_pad > 0:
        reject = set(rng.sample(range(n_full), n_pad))  # ordinals of emitted pairs whose draft is rejected
        i, ordinal = 0, 0
        while i < len(response):
            out.append(response[i])
            i += 1
            if ordinal in reject or i == len(response):
                out.append(pad_token_id)
            else:
                out.append(response[i])
                i += 1
            ordinal += 1
        return out
    split = set(rng.sample(range(n_full), n_pad)) if n_pad else set()
    for p in range(n_full):
        a, b = response[2 * p], response[2 * p + 1]
        out += [a, pad_token_id, b, pad_token_id] if p in split else [a, b]
    if len(response) % 2:
        out += [response[-1], pad_token_id]
    return out


@dataclass
class PipoDataCollator:
    """Turn records into PIPO batches `{input_ids, attention_mask, labels}` (see the module docstring).

    Args:
        tokenizer: used to tokenise raw records (`messages` or `prompt`/`response`) and to find PAD/EOS.
        pad_token_id: the PIPO PAD id; defaults to `tokenizer.pad_token_id`.
        max_length: right-truncate rows (after augmentation) to this many tokens, rounded down to even.
        max_pad_ratio: upper bound of the per-call PAD ratio `r ~ U[0, max_pad_ratio]` (0 disables augmentation).
        pad_augmentation: `"split"`, `"shift"` or `"none"`.
        min_split_pairs: minimum PAD insertions per row (reference: 1; default 0).
        mask_response_prefix: a string (tokenised without special tokens) or token ids that is moved from the
            start of the response into the prompt when present (e.g. `"<think>\\n"`).
        require_response: reject prompt-only records (True for SFT).
        return_prompts: also return the raw prompts left-padded, for rollouts.
        pad_to_multiple_of: pad the batch width to a multiple of this (even) number.
        seed: seed of a private RNG; None uses Python's global `random` (seeded by `Trainer` and reseeded per
            dataloader worker by torch).
        add_eos / chat_template_kwargs: passed to [`encode_record`] for raw records.
    """

    tokenizer: Any = None
    pad_token_id: int | None = None
    max_length: int | None = None
    max_pad_ratio: float = 0.25
    pad_augmentation: str = "split"
    min_split_pairs: int = 0
    mask_response_prefix: str | list[int] | None = None
    require_response: bool = True
    return_prompts: bool = False
    pad_to_multiple_of: int | None = None
    seed: int | None = None
    add_eos: bool = True
    chat_template_kwargs: dict | None = None
    last_ratio: float = field(default=0.0, init=False)
    # Set by the trainers: with `record_seed` given and every feature carrying its dataset index (INDEX_KEY), the
    # augmentation of a batch draws from an RNG seeded by (record_seed, epoch, indices), so it does not depend on how
    # many batches were collated before (dataloader prefetch, skipped batches on resume, workers).
    record_seed: int | None = field(default=None, init=False)
    epoch: int = field(default=0, init=False)

    def __post_init__(self):
        if self.pad_token_id is None:
            if self.tokenizer is None or self.tokenizer.pad_token_id is None:
                raise ValueError("PipoDataCollator needs pad_token_id (or a tokenizer with a pad token).")
            self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_augmentation not in PAD_AUGMENTATIONS:
            raise ValueError(
                f"pad_augmentation must be one of {PAD_AUGMENTATIONS}, got {self.pad_augmentation!r}."
            )
        if not 0.0 <= self.max_pad_ratio <= 1.0:
            raise ValueError(f"max_pad_ratio must lie in [0, 1], got {self.max_pad_ratio}.")
        if self.min_split_pairs < 0:
            raise ValueError(f"min_split_pairs must be >= 0, got {self.min_split_pairs}.")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (one pair), got {self.max_length}.")
        if self.pad_to_multiple_of is not None and (self.pad_to_multiple_of <= 0 or self.pad_to_multiple_of % 2):
            raise ValueError(f"pad_to_multiple_of must be a positive even number, got {self.pad_to_multiple_of}.")
        prefix = self.mask_response_prefix
        if isinstance(prefix, str):
            if self.tokenizer is None:
                raise ValueError("mask_response_prefix given as text needs a tokenizer.")
            prefix = list(self.tokenizer(prefix, add_special_tokens=False)["input_ids"])
            if not prefix:
                raise ValueError(f"mask_response_prefix {self.mask_response_prefix!r} tokenises to nothing.")
        self._prefix_ids = list(prefix) if prefix else []
        # None means Python's global `random` (kept as a lookup, not an attribute, so the collator pickles for
        # spawned dataloader workers).
        self._rng = random.Random(self.seed) if self.seed is not None else None

    # -- per row ----------------------------------------------------------------------------------------------------

    def encode(self, feature: dict) -> dict[str, list[int]]:
        """Token ids of one feature (raw records are tokenised here)."""
        if "prompt_ids" in feature:
            prompt = [int(t) for t in feature["prompt_ids"]]
            response = [int(t) for t in (feature.get("response_ids") or [])]
            if not prompt:
                raise PipoDataError(f"empty prompt_ids{_where(feature)}")
            if self.require_response and not response:
                raise PipoDataError(f"empty response_ids{_where(feature)}")
            if self.pad_token_id in prompt or self.pad_token_id in response:
                raise PipoDataError(f"record contains the PIPO PAD id {self.pad_token_id}{_where(feature)}")
            return {"prompt_ids": prompt, "response_ids": response}
        if self.tokenizer is None:
            raise PipoDataError("raw records need a tokenizer; pre-tokenise into prompt_ids/response_ids instead")
        try:
            return encode_record(
                feature,
                self.tokenizer,
                require_response=self.require_response,
                add_eos=self.add_eos,
                chat_template_kwargs=self.chat_template_kwargs,
                pad_token_id=self.pad_token_id,
            )
        except PipoDataError as exc:
            raise PipoDataError(f"{exc}{_where(feature)}") from None

    def build_row(
        self, prompt: list[int], response: list[int], ratio: float, rng: random.Random | None = None
    ) -> tuple[list[int], list[int]]:
        """`(ids, labels)` of one row laid out in pairs (steps 1-5 of the module docstring)."""
        pad = self.pad_token_id
        prompt, response = list(prompt), list(response)
        n = len(self._prefix_ids)
        if n and response[:n] == self._prefix_ids:
            prompt, response = prompt + response[:n], response[n:]
        body = augment_response(
            response, pad, ratio, self.pad_augmentation, self.min_split_pairs, rng or self._rng or random
        ) if response else []
        # The parity step shared with `PipoForCausalLM.forward` (DESIGN §1.2): PAD after an odd prompt, even total.
        ids, labels = align_row(prompt + body, [IGNORE_INDEX] * len(prompt) + [t if t != pad else IGNORE_INDEX
                                                                              for t in body], pad)
        if self.max_length is not None:
            cut = self.max_length - self.max_length % 2
            ids, labels = ids[:cut], labels[:cut]
        return ids, labels

    # -- batch ------------------------------------------------------------------------------------------------------

    def draw_ratio(self, rng: random.Random | None = None) -> float:
        if self.pad_augmentation == "none" or self.max_pad_ratio <= 0:
            return 0.0
        return (rng or self._rng or random).uniform(0.0, self.max_pad_ratio)

    def batch_rng(self, features: list[dict]) -> random.Random | None:
        """The per-batch RNG keyed by (record_seed, epoch, dataset indices), or None (use the collator's RNG)."""
        if self.record_seed is None:
            return None
        indices = [f.get(INDEX_KEY) if isinstance(f, dict) else None for f in features]
        if any(i is None for i in indices):
            return None
        return random.Random(f"pipo-augment:{self.record_seed}:{self.epoch}:{','.join(str(int(i)) for i in indices)}")

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("PipoDataCollator got an empty batch.")
        encoded = [self.encode(f) for f in features]
        rng = self.batch_rng(features)
        ratio = self.draw_ratio(rng)
        self.last_ratio = ratio
        rows = [self.build_row(e["prompt_ids"], e["response_ids"], ratio, rng) for e in encoded]
        pad = self.pad_token_id
        width = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, (ids, lab) in enumerate(rows):
            input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[b, : len(lab)] = torch.tensor(lab, dtype=torch.long)
            attention_mask[b, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.return_prompts:
            prompts = [e["prompt_ids"] for e in encoded]
            p_width = max(len(p) for p in prompts)
            batch["prompts"] = torch.full((len(prompts), p_width), pad, dtype=torch.long)
            batch["prompt_attention_mask"] = torch.zeros((len(prompts), p_width), dtype=torch.long)
            for b, p in enumerate(prompts):
                batch["prompts"][b, p_width - len(p) :] = torch.tensor(p, dtype=torch.long)
                batch["prompt_attention_mask"][b, p_width - len(p) :] = 1
        return batch


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style view of `data` whose items also carry their index (INDEX_KEY), for [`PipoDataCollator.batch_rng`]."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.data[index])
        item[INDEX_KEY] = int(index)
        return item


def _where(feature: dict) -> str:
    return f" (line {feature['line']})" if isinstance(feature, dict) and "line" in feature else ""


__all__ = ["PipoDataCollator", "IndexedDataset", "augment_response", "IGNORE_INDEX", "INDEX_KEY", "PAD_AUGMENTATIONS"]
