"""Wrap a pretrained decoder-only causal LM as a PIPO model (`PipoForCausalLM.from_backbone`, DESIGN §5.1).

Conversion code: not part of the remote-code files a saved PIPO folder ships (those only load, run and generate).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.utils import logging

from ..configuration_pipo import PipoConfig, _as_id_list
from ..generation_pipo import DEFAULT_CONFIDENCE_THRESHOLD
from ..modeling_pipo import (
    COMPRESSOR_CLASSES,
    PipoConfidenceHead,
    PipoForCausalLM,
    PipoMTPHead,
    _decoder_layers,
    _norm_template,
)

DEFAULT_PAD_TOKEN = "<|pipo_pad|>"  # the dedicated PAD token added to a tokenizer that has no usable pad
logger = logging.get_logger(__name__)


def from_backbone(
    model_or_path,
    tokenizer=None,
    *,
    pad_token_id: int | None = None,
    pad_token: str = DEFAULT_PAD_TOKEN,
    compressor_type: str = "mlp",
    mtp_init: str | None = None,
    mtp_fc_init: str = "hidden_only",
    pipo_confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    return_tokenizer: bool = False,
    backbone_kwargs: dict | None = None,
    model_class: type[PipoForCausalLM] = PipoForCausalLM,
    **config_kwargs,
):
    """Wrap a pretrained `*ForCausalLM` (a model object or a path/Hub id) as a PIPO model.

    The backbone body and LM head are reused as they are (bit-identical). The compressor gets its identity-like init;
    the MTP layer comes from the checkpoint's native `mtp.*` weights when present (Qwen3.5), else from a copy of the
    last full-attention backbone layer (`mtp_init`); the confidence head starts near `c = 0.5`.

    What changes on the objects passed in (deliberately: a multi-billion-parameter backbone is never copied):

    - **model**: its body and LM head *become* the PIPO model's `model.backbone` and `lm_head` (shared modules, not
      copies), and when a dedicated PAD is added beyond its vocabulary its embeddings are resized in place
      (`resize_token_embeddings`). Its config and generation config are not modified (the PIPO model gets copies).
      Keep using the returned PIPO model, not the backbone object.
    - **tokenizer**: a dedicated `pad_token` is added when needed, and its pad token is set to the PIPO PAD, in
      place, so batching pads with it. Pass a copy to keep the original.

    PAD and EOS (PIPO's PAD marks a rejected draft: it is never emitted and must never stop generation):

    - The PAD is `pad_token_id` if given, else the tokenizer's pad token, else the backbone config's.
    - A PAD that is also an EOS id (Qwen3 lists its pad `<|endoftext|>` in `generation_config.eos_token_id`;
      the Qwen3.5 PIPO release uses `<|endoftext|>` as PAD) is **removed from every EOS list** of the converted
      model (backbone config and generation config), as the PIPO authors do for Qwen3.5, and one warning names the
      ids. The vocabulary and the token's trained embedding stay as they are, and the model matches the
      `hub_configs` presets and converted releases.
    - Removing is refused when the PAD is the model's main stop token (the tokenizer's `eos_token`) or the only EOS
      id (GPT-2's `<|endoftext|>`, base models whose pad is their EOS): a PAD taken from the tokenizer/config is then
      replaced by a dedicated `pad_token` added to `tokenizer` (embeddings resized only when the new id does not
      fit), and an explicit `pad_token_id` that is the only EOS id is an error.
    - Without any pad, `pad_token` is added to `tokenizer` (Llama 3, Mistral, GPT-2); pass e.g.
      `pad_token="<|finetune_right_pad_id|>"` to reuse a reserved token of the vocabulary instead.

    Returns the model, or `(model, tokenizer)` with `return_tokenizer=True`.

    Args:
        pipo_confidence_threshold: τ saved as `generation_config.pipo_confidence_threshold`.
        backbone_kwargs: passed to `AutoModelForCausalLM.from_pretrained` when a path is given (dtype, ...).
        model_class: the PIPO class to build (`PipoForCausalLM.from_backbone` passes its own class).
        config_kwargs: extra [`PipoConfig`] fields (loss weights, `confidence_hidden_size`, ...).
    """
    from transformers import AutoModelForCausalLM

    misspelled = sorted(set(config_kwargs) & {"confidence_threshold", "threshold", "tau"})
    if misspelled:  # PipoConfig would silently keep an unknown field
        raise TypeError(f"from_backbone: unknown argument(s) {misspelled}; τ is `pipo_confidence_threshold`.")
    native = None
    if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        path = str(model_or_path)
        causal_lm = AutoModelForCausalLM.from_pretrained(path, **(backbone_kwargs or {}))
        native = native_mtp_state_dict(path)
    elif isinstance(model_or_path, PreTrainedModel):
        causal_lm = model_or_path
    else:
        raise TypeError(f"from_backbone expects a *ForCausalLM model or a path, got {type(model_or_path)}.")
    if getattr(causal_lm.config, "model_type", None) == "pipo":
        raise ValueError("from_backbone got a model that is already a PIPO model.")
    if getattr(causal_lm, "get_output_embeddings", lambda: None)() is None:
        raise ValueError(f"{type(causal_lm).__name__} has no LM head; pass a *ForCausalLM model.")

    bb_config = causal_lm.config.get_text_config(decoder=True)
    source_generation = getattr(causal_lm, "generation_config", None)
    layout = resolve_pad_and_eos(
        bb_config, source_generation, tokenizer, pad_token_id=pad_token_id,
        vocab_rows=causal_lm.get_input_embeddings().weight.shape[0],
    )
    if layout.add_pad_token:
        tokenizer.add_special_tokens({"pad_token": pad_token})
        layout.pad_token_id = tokenizer.pad_token_id
    elif tokenizer is not None and tokenizer.pad_token_id != layout.pad_token_id < len(tokenizer):
        # Batching (pipeline, collators) pads with the tokenizer's pad token: make it the PIPO PAD.
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(layout.pad_token_id)
    pad_token_id = layout.pad_token_id
    if tokenizer is not None and pad_token_id >= causal_lm.get_input_embeddings().weight.shape[0]:
        causal_lm.resize_token_embeddings(len(tokenizer))
        bb_config = causal_lm.config.get_text_config(decoder=True)
    if layout.removed:
        logger.warning(layout.warning(tokenizer, getattr(causal_lm.config, "name_or_path", "") or ""))
    bb_config = copy.deepcopy(bb_config)
    bb_config.eos_token_id = layout.config_eos
    if mtp_init is None:
        mtp_init = "native" if native else "last_layer"
    if mtp_init == "native" and not native:
        raise ValueError("mtp_init='native' but the backbone checkpoint has no `mtp.*` weights.")

    config = PipoConfig(
        backbone_config=bb_config,
        pad_token_id=pad_token_id,
        compressor_type=compressor_type,
        mtp_init=mtp_init,
        mtp_fc_init=mtp_fc_init,
        **config_kwargs,
    )
    config._attn_implementation = bb_config._attn_implementation
    with torch.device("meta"):
        pipo = model_class(config)  # cheap skeleton; the real backbone is swapped in below
    body = getattr(causal_lm, causal_lm.base_model_prefix)
    pipo.model.backbone = body
    pipo.lm_head = causal_lm.get_output_embeddings()
    weight = pipo.lm_head.weight
    device, dtype = weight.device, weight.dtype
    hidden = config.hidden_size
    template = _norm_template(body)
    heads = pipo.model
    with torch.device(device):
        heads.compressor = COMPRESSOR_CLASSES[compressor_type](hidden)
        heads.mtp = PipoMTPHead(config.backbone_config, template)
        heads.confidence_head = PipoConfidenceHead(hidden, config.confidence_hidden_size or hidden, template)
    for head in (heads.compressor, heads.mtp, heads.confidence_head):
        for module in reversed(list(head.modules())):  # children first, as in post_init
            pipo._init_weights(module)
    heads.mtp.to(dtype)
    _init_mtp_from_backbone(pipo, body, mtp_init, native)
    source_generation = source_generation if source_generation is not None else GenerationConfig()
    pipo.generation_config = copy.deepcopy(source_generation)
    pipo.generation_config._from_model_config = False
    pipo.generation_config.pad_token_id = pad_token_id
    pipo.generation_config.eos_token_id = layout.generation_eos
    if pipo.generation_config.do_sample is None:
        # An explicit value stops pipeline() from injecting its sampling defaults (DESIGN §5.4).
        pipo.generation_config.do_sample = False
    pipo.generation_config.pipo_confidence_threshold = pipo_confidence_threshold
    pipo.config.name_or_path = getattr(causal_lm.config, "name_or_path", "")
    pipo.train(causal_lm.training)
    return (pipo, tokenizer) if return_tokenizer else pipo


@dataclass
class PadEosLayout:
    """Outcome of [`resolve_pad_and_eos`]: the PAD and the EOS lists of the converted model."""

    pad_token_id: int | None
    add_pad_token: bool  # a dedicated PAD token must be added to the tokenizer
    config_eos: int | list[int] | None  # backbone config's eos_token_id, PAD removed
    generation_eos: int | list[int] | None  # generation config's eos_token_id, PAD removed
    removed: dict[str, list[int]]  # where the PAD was an EOS id: {"generation_config": [...], ...}

    def warning(self, tokenizer=None, source: str = "") -> str:
        token = ""
        if tokenizer is not None:
            token = f" {tokenizer.convert_ids_to_tokens(self.pad_token_id)!r}"
        where = "; ".join(f"{name}.eos_token_id {ids}" for name, ids in self.removed.items())
        return (
            f"PIPO PAD {self.pad_token_id}{token} is also an EOS id of the backbone{' ' + source if source else ''} "
            f"({where}). PAD marks a rejected draft and is never emitted, so it was removed from every EOS list: "
            f"generation_config.eos_token_id={self.generation_eos}, backbone eos_token_id={self.config_eos}."
        )


def _unique(ids) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i is not None and int(i) not in out:
            out.append(int(i))
    return out


def _drop(value, pad: int):
    """`value` (None, int or list of ids) without `pad`, keeping its shape; None when nothing is left."""
    ids = [i for i in _as_id_list(value) if i != pad]
    if not ids:
        return None
    return ids[0] if isinstance(value, int) else ids


def resolve_pad_and_eos(
    backbone_config,
    generation_config=None,
    tokenizer=None,
    *,
    pad_token_id: int | None = None,
    vocab_rows: int | None = None,
) -> PadEosLayout:
    """Choose the PIPO PAD of a backbone and its EOS lists with that PAD removed (rule in `from_backbone`).

    Pure: reads the backbone config, its generation config and the tokenizer, changes none of them.
    """
    config_eos = _as_id_list(getattr(backbone_config, "eos_token_id", None))
    generation_eos = _as_id_list(getattr(generation_config, "eos_token_id", None)) if generation_config else []
    tokenizer_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    stop_ids = _unique(generation_eos + config_eos + [tokenizer_eos])

    def others(pad: int) -> list[int]:
        return [i for i in stop_ids if i != pad]

    explicit = pad_token_id is not None
    add = False
    if explicit:
        pad = int(pad_token_id)
        if vocab_rows is not None and not 0 <= pad < vocab_rows:
            raise ValueError(f"from_backbone: pad_token_id={pad} is outside the backbone vocabulary [0, {vocab_rows}).")
        if pad in stop_ids and not others(pad):
            raise ValueError(
                f"from_backbone: pad_token_id={pad} equals an EOS id and is the backbone's only one ({stop_ids}): "
                "PAD marks a rejected draft and is never emitted, so the model could never stop. Pass another "
                "pad_token_id, or tokenizer= without pad_token_id to add a dedicated PAD token."
            )
    else:
        pad = tokenizer.pad_token_id if tokenizer is not None else getattr(backbone_config, "pad_token_id", None)
        if pad is not None and pad in stop_ids and (pad == tokenizer_eos or not others(pad)):
            pad = None  # the main stop token: never remove it, use a dedicated PAD instead
        if pad is None:
            if tokenizer is None:
                raise ValueError(
                    "from_backbone needs a PAD id distinct from EOS: pass tokenizer= (a dedicated PAD is added when "
                    "needed) or pad_token_id=."
                )
            add = True
    if add:
        return PadEosLayout(None, True, getattr(backbone_config, "eos_token_id", None),
                            getattr(generation_config, "eos_token_id", None) if generation_config else None, {})
    removed = {}
    if pad in generation_eos:
        removed["generation_config"] = generation_eos
    if pad in config_eos:
        removed["config"] = config_eos
    if pad == tokenizer_eos:
        removed["tokenizer"] = [tokenizer_eos]
    fallback = others(pad)
    fallback = fallback[0] if len(fallback) == 1 else (fallback or None)
    new_config_eos = _drop(getattr(backbone_config, "eos_token_id", None), pad)
    new_generation_eos = _drop(getattr(generation_config, "eos_token_id", None) if generation_config else None, pad)
    if new_generation_eos is None and removed:
        new_generation_eos = fallback
    if new_config_eos is None and removed:
        ids = _as_id_list(new_generation_eos)
        new_config_eos = ids[0] if len(ids) == 1 else (ids or None)
    if not removed:
        new_config_eos = getattr(backbone_config, "eos_token_id", None)
        new_generation_eos = getattr(generation_config, "eos_token_id", None) if generation_config else None
    return PadEosLayout(pad, False, new_config_eos, new_generation_eos, removed)


def native_mtp_state_dict(path: str) -> dict[str, torch.Tensor] | None:
    """The `mtp.*` tensors of a checkpoint (Qwen3.5 ships a native MTP layer), keys without the `mtp.` prefix."""
    import json
    import os

    from safetensors import safe_open
    from transformers.utils import cached_file

    def resolve(name):
        if os.path.isdir(path):
            candidate = os.path.join(path, name)
            return candidate if os.path.isfile(candidate) else None
        try:
            return cached_file(path, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None

    index = resolve("model.safetensors.index.json")
    if index is not None:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({v for k, v in weight_map.items() if k.startswith("mtp.")})
        files = [resolve(f) for f in files]
    else:
        single = resolve("model.safetensors")
        files = [single] if single is not None else []
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                if key.startswith("mtp."):
                    tensors[key[len("mtp.") :]] = handle.get_tensor(key)
    return tensors or None


def _init_mtp_from_backbone(pipo, body: nn.Module, scheme: str, native: dict | None) -> None:
    """Initialise the MTP decoder layer (and its final norm / position tables) from the backbone (DESIGN §1.5)."""
    mtp = pipo.mtp
    if scheme == "native":
        result = mtp.load_state_dict(native, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(("rotary_emb", "_body"))]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"Native MTP weights do not match the MTP head: missing {missing}, unexpected "
                f"{result.unexpected_keys}."
            )
        return
    bb_config = pipo.config.backbone_config
    layers = _decoder_layers(body, bb_config.num_hidden_layers)
    for name, child in mtp.named_children():
        if name in ("fc", "pre_fc_norm_embedding", "pre_fc_norm_hidden"):
            continue
        source = getattr(body, name, None)
        if child is _decoder_layers(mtp, 1):
            if scheme == "random":
                continue
            types = getattr(bb_config, "layer_types", None) or ["full_attention"] * len(layers)
            full = [i for i, t in enumerate(types) if t == "full_attention"]
            source_layer = layers[full[-1] if full else len(layers) - 1]
            target = child[0]
            src_state = source_layer.state_dict()
            tgt_state = target.state_dict()
            if set(src_state) == set(tgt_state) and all(src_state[k].shape == tgt_state[k].shape for k in src_state):
                target.load_state_dict(src_state)
        elif isinstance(source, nn.Module) and source is not body.get_input_embeddings():
            src_state, tgt_state = source.state_dict(), child.state_dict()
            if src_state and set(src_state) == set(tgt_state):
                if all(src_state[k].shape == tgt_state[k].shape for k in src_state):
                    child.load_state_dict(src_state)


__all__ = ["from_backbone", "resolve_pad_and_eos", "native_mtp_state_dict", "PadEosLayout", "DEFAULT_PAD_TOKEN"]
