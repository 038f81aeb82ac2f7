"""Convert a checkpoint in the PIPO authors' released layout into a `PipoForCausalLM` checkpoint.

Reference layout (DESIGN §6.1), merged safetensors (single file or sharded with `model.safetensors.index.json`):

    model.language_model.*      backbone: embed_tokens, layers.N.*, norm   (a bare `model.*` prefix is accepted)
    lm_head.weight              only when the LM head is untied (absent when tied, e.g. Qwen3.5-4B)
    mtp.fc.weight, mtp.pre_fc_norm_{embedding,hidden}.weight, mtp.layers.0.*, mtp.norm.weight
    compressor.linear.{weight,bias}  or  compressor.mlp.{0,2}.{weight,bias}
    confidence_head.{norm,fc1,fc2}.weight
    model.visual.*              vision tower of the VL release: ignored

`config.json` is the backbone's *text* config, flat (`model_type: "qwen3_5_text"`) or nested under `text_config`,
with `architectures: ["Qwen3_5ForCausalPIPO"]`, `compressor_type`, `pad_token_id` and `mtp_num_hidden_layers` (and
optionally `mtp_loss_weight`, `confidence_loss_weight`, a threshold `conf_threshold` / `pipo_conf_threshold`).

An unmerged LoRA adapter folder (DESIGN §6.2: `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_{A,B}.weight` and full copies of the `modules_to_save` modules) is merged into its
base checkpoint first (`W += alpha/r · B·A`, rsLoRA and per-module rank/alpha patterns honoured); DoRA and
embedding LoRA are refused.

Our layout (DESIGN §6) nests the reference names under the body: backbone `model.backbone.*`, heads
`model.compressor.*`, `model.mtp.*`, `model.confidence_head.*`, and `lm_head.weight`; the conversion is a rename plus a
strict check: every source tensor must land in a parameter of the PIPO model and
every parameter must be filled, otherwise [`ReferenceLayoutError`] lists the unexpected and the missing keys.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..generation_pipo import DEFAULT_CONFIDENCE_THRESHOLD
from ..modeling_pipo import PIPO_HEADS

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REFERENCE_ARCHITECTURE = "Qwen3_5ForCausalPIPO"
QWEN35_PAD = 248044  # hard-coded PAD of the reference for Qwen3.5 (vocabulary 248320)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
# Config fields that belong to the PIPO wrapper or the reference's serving code, not to the backbone config.
THRESHOLD_FIELDS = ("pipo_confidence_threshold", "conf_threshold", "pipo_conf_threshold")
PIPO_CONFIG_FIELDS = (
    "compressor_type", "mtp_num_hidden_layers", "mtp_loss_weight", "confidence_loss_weight", *THRESHOLD_FIELDS,
    "architectures", "auto_map", "transformers_version", "_name_or_path", "text_config", "vision_config",
)
IGNORED_PREFIXES = ("model.visual.",)
_LIST_LIMIT = 40


class ReferenceLayoutError(ValueError):
    """The source does not follow the reference layout; names the unexpected, missing and mis-shaped keys."""

    def __init__(self, message: str, unexpected=(), missing=(), mismatched=()):
        self.unexpected = sorted(unexpected)
        self.missing = sorted(missing)
        self.mismatched = sorted(mismatched)
        parts = [message]
        for title, keys in (("unexpected keys (in the checkpoint, unused by the PIPO model)", self.unexpected),
                            ("missing keys (needed by the PIPO model, not in the checkpoint)", self.missing),
                            ("shape mismatches", self.mismatched)):
            if keys:
                shown = "\n    ".join(keys[:_LIST_LIMIT])
                more = f"\n    ... and {len(keys) - _LIST_LIMIT} more" if len(keys) > _LIST_LIMIT else ""
                parts.append(f"  {len(keys)} {title}:\n    {shown}{more}")
        super().__init__("\n".join(parts))


@dataclass
class ConversionReport:
    """What the conversion did; `mapped` + `ignored` (+ `dropped_tied`) covers every source tensor."""

    destination: str
    source_keys: int
    mapped: dict[str, str] = field(default_factory=dict)  # source key -> PIPO key
    ignored: list[str] = field(default_factory=list)  # vision tower keys
    dropped_tied: list[str] = field(default_factory=list)  # an lm_head.weight equal to the tied embedding
    compressor_type: str = ""
    tie_word_embeddings: bool = True
    pad_token_id: int = -1
    eos_token_ids: list[int] = field(default_factory=list)
    config_style: str = ""  # "flat" | "nested"
    merged_lora: dict | None = None  # {"modules": n, "base": path} when an adapter was merged
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"wrote {self.destination}",
            f"  source tensors: {self.source_keys} (mapped {len(self.mapped)}, ignored {len(self.ignored)}"
            f"{', dropped tied lm_head' if self.dropped_tied else ''})",
            f"  config: {self.config_style}; compressor: {self.compressor_type}; tied embeddings: "
            f"{self.tie_word_embeddings}; PAD {self.pad_token_id}; EOS {self.eos_token_ids}",
        ]
        if self.merged_lora:
            lines.append(f"  merged LoRA: {self.merged_lora['modules']} modules into {self.merged_lora['base']}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_safetensors(folder: Path, single: str = SAFE_SINGLE, index: str = SAFE_INDEX) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint; memory-mapped by safetensors."""
    from safetensors import safe_open

    if (folder / index).is_file():
        files = sorted(set(_read_json(folder / index)["weight_map"].values()))
    elif (folder / single).is_file():
        files = [single]
    else:
        raise FileNotFoundError(
            f"{folder}: no {single} or {index}; the reference layout is a safetensors checkpoint "
            "(or a LoRA adapter folder with adapter_config.json)."
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as handle:
            for key in handle.keys():
                if key in tensors:
                    raise ReferenceLayoutError(f"{folder}: key {key!r} appears in more than one shard.")
                tensors[key] = handle.get_tensor(key)
    return tensors


def split_reference_config(raw: dict) -> tuple[dict, dict, str]:
    """`(text_config_fields, pipo_fields, style)` of a reference config.json (flat or nested under text_config)."""
    if isinstance(raw.get("text_config"), dict):
        style = "nested"
        text = dict(raw["text_config"])
        # In composite configs the top level decides tying; top-level PIPO fields win over the text ones.
        for key in ("tie_word_embeddings",):
            if key in raw:
                text[key] = raw[key]
        top = raw
    else:
        style = "flat"
        text = dict(raw)
        top = raw
    pipo = {k: top.get(k, text.get(k)) for k in ("compressor_type", "mtp_num_hidden_layers", "pad_token_id",
                                                 "mtp_loss_weight", "confidence_loss_weight", "architectures",
                                                 "_name_or_path")}
    if pipo["pad_token_id"] is None:
        pipo["pad_token_id"] = text.get("pad_token_id")
    thresholds = [top.get(k, text.get(k)) for k in THRESHOLD_FIELDS]
    pipo["confidence_threshold"] = next((t for t in thresholds if t is not None), None)
    for key in PIPO_CONFIG_FIELDS:
        text.pop(key, None)
    if "model_type" not in text:
        raise ReferenceLayoutError(
            "config.json has no model_type for the backbone (expected e.g. 'qwen3_5_text', flat or under "
            "text_config)."
        )
    return text, pipo, style


def _find_compressor_type(tensors: dict[str, torch.Tensor]) -> str | None:
    """'linear' or 'mlp' from the `compressor.<type>.*` keys (None when there are none)."""
    keys = [key for key in tensors if key.startswith("compressor.")]
    kinds = {key.split(".")[1] for key in keys}
    foreign = [key for key in keys if key.split(".")[1] not in ("linear", "mlp")]
    if foreign:
        raise ReferenceLayoutError(
            "compressor tensors outside the reference's 'compressor.linear.*' / 'compressor.mlp.*' layout.",
            unexpected=foreign,
        )
    if len(kinds) > 1:
        raise ReferenceLayoutError(f"the checkpoint holds tensors of several compressors: {sorted(kinds)}.")
    return next(iter(kinds), None)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA adapters (DESIGN §6.2)
# ----------------------------------------------------------------------------------------------------------------------

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


def _pattern_value(patterns: dict, module: str, default):
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return default


def _target_key(base: dict[str, torch.Tensor], key: str) -> str:
    """The base key of an adapter key (adapters name the backbone `model.*`, merged checkpoints may nest it)."""
    if key in base:
        return key
    if key.startswith("model.") and not key.startswith("model.language_model."):
        nested = "model.language_model." + key[len("model."):]
        if nested in base or any(k.startswith("model.language_model.") for k in base):
            return nested
    return key


def merge_lora_adapter(adapter_dir: Path, base: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge an unmerged PEFT LoRA adapter into `base` tensors (reference layout). Returns `(tensors, info)`."""
    cfg = _read_json(adapter_dir / ADAPTER_CONFIG)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter_dir}: adapter type {cfg.get('peft_type')!r} is not LoRA; only LoRA is merged.")
    if cfg.get("use_dora"):
        raise ValueError(
            f"{adapter_dir}: DoRA adapters are not supported by convert-reference; merge them first (peft "
            "merge_and_unload, or `swift export --merge_lora true`) and convert the merged folder."
        )
    weights_file = adapter_dir / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise FileNotFoundError(f"{adapter_dir}: {ADAPTER_WEIGHTS} is missing (adapter_model.bin is not supported).")
    adapter = read_safetensors(adapter_dir, single=ADAPTER_WEIGHTS, index="adapter_model.safetensors.index.json")
    alpha = cfg.get("lora_alpha", 8)
    rslora = bool(cfg.get("use_rslora", False))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))

    merged = dict(base)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    overrides: dict[str, torch.Tensor] = {}
    for key, value in adapter.items():
        if not key.startswith("base_model.model."):
            raise ReferenceLayoutError(f"{adapter_dir}: adapter key {key!r} lacks the 'base_model.model.' prefix.")
        key = key[len("base_model.model."):]
        if "lora_embedding_" in key or "lora_magnitude_vector" in key:
            raise ValueError(f"{adapter_dir}: adapter key {key!r} (embedding LoRA / DoRA) cannot be merged here.")
        match = _LORA_KEY.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["part"]] = value
            continue
        if ".original_module." in key:
            continue  # the frozen copy kept next to a modules_to_save module
        key = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", key)  # tolerate unstripped wrapper names
        overrides[_target_key(base, key)] = value

    for module, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            raise ReferenceLayoutError(f"{adapter_dir}: LoRA module {module!r} has only lora_{''.join(parts)}.")
        a, b = parts["A"].float(), parts["B"].float()
        rank = a.shape[0]
        module_alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha)
        scale = module_alpha / (math.sqrt(rank) if rslora else rank)
        target = _target_key(base, f"{module}.weight")
        if target not in merged:
            raise ReferenceLayoutError(
                f"LoRA module {module!r} has no base weight {target!r} in the base checkpoint.", missing=[target]
            )
        weight = merged[target]
        delta = (b @ a) * scale
        if fan_in_fan_out:
            delta = delta.T
        if delta.shape != weight.shape:
            raise ReferenceLayoutError(
                f"LoRA delta for {module!r} has shape {tuple(delta.shape)}, base weight {tuple(weight.shape)}.",
                mismatched=[f"{target}: {tuple(weight.shape)} vs LoRA {tuple(delta.shape)}"],
            )
        merged[target] = (weight.float() + delta).to(weight.dtype)
    merged.update(overrides)
    return merged, {"modules": len(pairs), "overrides": len(overrides), "config": cfg}


def _adapter_compressor_type(adapter_dir: Path, cfg: dict) -> str | None:
    if cfg.get("compressor_type"):
        return cfg["compressor_type"]
    extra = adapter_dir / "additional_config.json"
    if extra.is_file():
        return _read_json(extra).get("compressor_type")
    return None


# ----------------------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------------------


def rename_reference_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, str], list[str], list[str]]:
    """`(mapping source→PIPO, ignored, unexpected)` for reference-layout keys."""
    nested = any(k.startswith("model.language_model.") for k in tensors)
    bare = [
        k for k in tensors if k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual."))
    ]
    if nested and bare:
        raise ReferenceLayoutError(
            "the checkpoint mixes 'model.language_model.*' and bare 'model.*' backbone keys.", unexpected=bare
        )
    mapping, ignored, unexpected = {}, [], []
    for key in tensors:
        if key.startswith(IGNORED_PREFIXES):
            ignored.append(key)
        elif key.startswith("model.language_model."):
            mapping[key] = "model.backbone." + key[len("model.language_model."):]
        elif key.startswith("model."):
            mapping[key] = "model.backbone." + key[len("model."):]
        elif key.startswith(tuple(f"{head}." for head in PIPO_HEADS)):
            mapping[key] = "model." + key
        elif key == "lm_head.weight":
            mapping[key] = key
        else:
            unexpected.append(key)
    return mapping, ignored, unexpected


def reference_key(key: str) -> str:
    """The reference-layout name of a PIPO parameter (inverse of [`rename_reference_keys`] for a bare backbone),
    so errors name keys as they appear in the checkpoint being converted."""
    if key.startswith("model.backbone."):
        return "model." + key[len("model.backbone."):]
    if key.startswith(tuple(f"model.{head}." for head in PIPO_HEADS)):
        return key[len("model."):]
    return key


def _refuse_pipo_checkpoint(src: Path) -> None:
    """A folder written by `save_pretrained` of a PIPO model (or by this converter) needs no conversion."""
    path = src / "config.json"
    if not path.is_file():
        return
    raw = _read_json(path)
    if raw.get("model_type") == "pipo" or "backbone_config" in raw:
        raise ValueError(
            f"convert-reference: {src} is already a PIPO checkpoint (config.json has model_type 'pipo'); there is "
            "nothing to convert. Load it with AutoModelForCausalLM.from_pretrained (or PipoForCausalLM"
            ".from_pretrained); convert-reference reads the PIPO authors' release layout only."
        )


def tokenizer_eos(folder: Path) -> tuple[str | None, int | None]:
    """`(eos_token, id)` named by the tokenizer files of `folder` (tokenizer_config.json + tokenizer.json), read
    as JSON so no tokenizer class has to be built; `(None, None)` when they name none."""
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return None, None
    config = _read_json(config_path)
    token = config.get("eos_token")
    if isinstance(token, dict):
        token = token.get("content")
    if not token:
        return None, None
    for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
        if entry.get("content") == token:
            return token, int(token_id)
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        data = _read_json(tokenizer_json)
        for entry in data.get("added_tokens") or []:
            if entry.get("content") == token:
                return token, int(entry["id"])
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and token in vocab:
            return token, int(vocab[token])
    return token, None


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def convert_reference(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    compressor_type: str | None = None,
    pad_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pipo_confidence_threshold: float | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    verify: bool = True,
) -> ConversionReport:
    """Convert `src` (reference layout, or a LoRA adapter folder merged into `base`) into a PIPO checkpoint at `dst`.

    Args:
        base: base checkpoint of a LoRA adapter (default: the adapter's `base_model_name_or_path` when it is a local
            folder). Ignored for merged checkpoints.
        compressor_type: overrides `compressor_type` of the adapter / additional / main config; must agree with
            the `compressor.*` keys.
        pad_token_id: PIPO PAD (default: the config's, else 248044 for a Qwen3.5 vocabulary).
        eos_token_id: EOS id(s) (default: `generation_config.json`'s, else the config's); the PAD is always removed,
            and when no id is left the tokenizer's `eos_token` is used (a Qwen3.5 release lists only the PAD
            248044 as EOS; its tokenizer names `<|im_end|>`, 248046).
        pipo_confidence_threshold: τ stored in the generation config (default: the source config's
            `pipo_confidence_threshold` / `conf_threshold` / `pipo_conf_threshold`, else
            `DEFAULT_CONFIDENCE_THRESHOLD` (0.95, the reference evaluation default)).

    Every PIPO field of the source (`compressor_type`, `pad_token_id`, `mtp_loss_weight`, `confidence_loss_weight`,
    τ, the generation config's sampling fields) or of the arguments is written so that it survives a reload.
    A folder that is already a PIPO checkpoint is refused with a clear error.
        verify: reload the written checkpoint with `PipoForCausalLM.from_pretrained` and check no key is missing
            or unexpected.
    """
    from transformers import AutoConfig, GenerationConfig

    from transformers_pipo import PipoConfig, PipoForCausalLM

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"convert-reference: source folder {src} does not exist.")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"convert-reference: destination {dst} is not empty (pass overwrite=True/--overwrite).")
    notes: list[str] = []
    _refuse_pipo_checkpoint(src)

    # -- tensors (merging a LoRA adapter first when given one) ---------------------------------------------------
    merged_info = None
    adapter_cfg: dict = {}
    if (src / ADAPTER_CONFIG).is_file():
        adapter_cfg = _read_json(src / ADAPTER_CONFIG)
        base_path = Path(base) if base is not None else None
        if base_path is None:
            candidate = adapter_cfg.get("base_model_name_or_path")
            if candidate and Path(candidate).is_dir():
                base_path = Path(candidate)
            else:
                raise ValueError(
                    f"convert-reference: {src} is an unmerged LoRA adapter (adapter_config.json) and its base "
                    f"{candidate!r} is not a local folder. Pass --base PATH (the checkpoint the adapter was trained "
                    "on, in the reference layout), or merge it first (`swift export --merge_lora true` / peft "
                    "merge_and_unload) and convert the merged folder."
                )
        if not (base_path / "config.json").is_file():
            raise FileNotFoundError(f"convert-reference: base checkpoint {base_path} has no config.json.")
        tensors, info = merge_lora_adapter(src, read_safetensors(base_path))
        merged_info = {"modules": info["modules"], "overrides": info["overrides"], "base": str(base_path)}
        config_dir = base_path
        adapter_compressor = _adapter_compressor_type(src, adapter_cfg)
    else:
        if base is not None:
            notes.append("--base ignored: the source is a merged checkpoint, not a LoRA adapter.")
        tensors = read_safetensors(src)
        config_dir = src
        adapter_compressor = None
    if not (config_dir / "config.json").is_file():
        raise FileNotFoundError(f"convert-reference: {config_dir} has no config.json.")
    raw_config = _read_json(config_dir / "config.json")
    text_fields, pipo_fields, style = split_reference_config(raw_config)
    if REFERENCE_ARCHITECTURE not in (pipo_fields.get("architectures") or []) and merged_info is None:
        notes.append(f"architectures {pipo_fields.get('architectures')} is not [{REFERENCE_ARCHITECTURE!r}].")
    if (pipo_fields.get("mtp_num_hidden_layers") or 1) != 1:
        raise ReferenceLayoutError(
            f"mtp_num_hidden_layers={pipo_fields['mtp_num_hidden_layers']}: PIPO pairs use exactly one MTP layer."
        )

    # -- key mapping --------------------------------------------------------------------------------------------
    mapping, ignored, unexpected = rename_reference_keys(tensors)
    renamed = {mapping[k]: tensors[k] for k in mapping}

    # -- compressor type -------------------------------------------------------------------------------------------
    from_keys = _find_compressor_type(tensors)
    extra_cfg = config_dir / "additional_config.json"
    declared = [
        ("--compressor-type", compressor_type),
        ("adapter/additional config", adapter_compressor),
        ("additional_config.json", _read_json(extra_cfg).get("compressor_type") if extra_cfg.is_file() else None),
        ("config.json", pipo_fields.get("compressor_type")),
    ]
    chosen = next(((where, value) for where, value in declared if value), (None, None))
    if from_keys is None and chosen[1] is None:
        raise ReferenceLayoutError(
            "no compressor tensors ('compressor.linear.*' or 'compressor.mlp.*') and no compressor_type in the "
            "config.", missing=["compressor.mlp.0.weight | compressor.linear.weight"]
        )
    ctype = from_keys or chosen[1]
    if chosen[1] and from_keys and chosen[1] != from_keys:
        raise ReferenceLayoutError(
            f"compressor_type {chosen[1]!r} (from {chosen[0]}) disagrees with the checkpoint's "
            f"'compressor.{from_keys}.*' tensors."
        )

    # -- tying, PAD, EOS -------------------------------------------------------------------------------------------
    embed = renamed.get("model.embed_tokens.weight")
    tie = bool(text_fields.get("tie_word_embeddings", False))
    dropped_tied: list[str] = []
    if "lm_head.weight" in renamed:
        if tie and embed is not None and torch.equal(renamed["lm_head.weight"], embed):
            renamed.pop("lm_head.weight")
            dropped_tied = ["lm_head.weight"]
        elif tie:
            tie = False
            notes.append("config says tie_word_embeddings=True but lm_head.weight differs from the embeddings: "
                         "converted as untied.")
    elif not tie:
        raise ReferenceLayoutError(
            "the config says the LM head is untied (tie_word_embeddings=False) but lm_head.weight is absent.",
            missing=["lm_head.weight"],
        )
    text_fields["tie_word_embeddings"] = tie

    vocab = int(text_fields.get("vocab_size", embed.shape[0] if embed is not None else 0))
    pad = pad_token_id if pad_token_id is not None else pipo_fields.get("pad_token_id")
    if pad is None:
        if text_fields.get("model_type") in ("qwen3_5_text", "qwen3_5_moe_text") and vocab == 248320:
            pad = QWEN35_PAD
            notes.append(f"pad_token_id not in the config: using the reference's Qwen3.5 PAD {QWEN35_PAD}.")
        else:
            raise ValueError("convert-reference: the config has no pad_token_id; pass --pad-token-id.")
    pad = int(pad)

    gen_dir = config_dir if (config_dir / "generation_config.json").is_file() else src
    src_gen = GenerationConfig.from_pretrained(gen_dir) if (gen_dir / "generation_config.json").is_file() else None
    if eos_token_id is not None:
        eos = _eos_list(eos_token_id)
    elif src_gen is not None and src_gen.eos_token_id is not None:
        eos = _eos_list(src_gen.eos_token_id)
    else:
        eos = _eos_list(text_fields.get("eos_token_id"))
    if pad in eos:
        eos = [e for e in eos if e != pad]
        notes.append(f"removed the PAD {pad} from the EOS ids (PAD marks a rejected draft, it must not stop).")
    if not eos:
        token, token_id = tokenizer_eos(src if (src / "tokenizer_config.json").is_file() else config_dir)
        if token_id is not None and token_id != pad:
            eos = [token_id]
            notes.append(f"EOS taken from the tokenizer's eos_token {token!r} ({token_id}).")
    if not eos:
        raise ValueError(
            f"convert-reference: after removing the PAD {pad}, no EOS id is left and the tokenizer names no other "
            "eos_token; pass --eos-token-id (for Qwen3.5 that is 248046, <|im_end|>)."
        )
    text_fields["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    text_fields["pad_token_id"] = pad

    # -- configs and the strict key check --------------------------------------------------------------------------
    model_type = text_fields.pop("model_type")
    try:
        backbone = AutoConfig.for_model(model_type, **text_fields)
    except Exception as err:  # unknown model_type or invalid fields
        raise ReferenceLayoutError(f"cannot build the backbone config (model_type {model_type!r}): {err}") from err
    backbone._name_or_path = pipo_fields.get("_name_or_path") or ""
    config = PipoConfig(
        backbone_config=backbone,
        compressor_type=ctype,
        pad_token_id=pad,
        mtp_init="native",
        tie_word_embeddings=tie,
        **{k: pipo_fields[k] for k in ("mtp_loss_weight", "confidence_loss_weight") if pipo_fields.get(k) is not None},
    )
    with torch.device("meta"):
        skeleton = PipoForCausalLM(config)
    expected = skeleton.state_dict()
    if config.tie_word_embeddings:
        for target in getattr(skeleton, "_tied_weights_keys", None) or {}:
            expected.pop(target, None)
    missing = sorted(reference_key(k) for k in set(expected) - set(renamed))
    unexpected_pipo = sorted(set(renamed) - set(expected))
    reverse = {v: k for k, v in mapping.items()}
    mismatched = [
        f"{reverse.get(k, k)}: checkpoint {tuple(renamed[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(renamed) & set(expected))
        if tuple(renamed[k].shape) != tuple(expected[k].shape)
    ]
    all_unexpected = unexpected + [reverse.get(k, k) for k in unexpected_pipo]
    if missing or all_unexpected or mismatched:
        raise ReferenceLayoutError(
            f"{src} does not match the reference PIPO layout for a {model_type} backbone with a "
            f"'{ctype}' compressor (see `pipo convert-reference --help`).",
            unexpected=all_unexpected, missing=missing, mismatched=mismatched,
        )

    # -- write --------------------------------------------------------------------------------------------------------
    # save_pretrained records the model's dtype in config.json: make it the backbone's (e.g. bfloat16)
    skeleton.to(Counter(t.dtype for t in renamed.values()).most_common(1)[0][0])
    gen = src_gen if src_gen is not None else GenerationConfig()
    gen.pad_token_id = pad
    gen.eos_token_id = eos
    if backbone.bos_token_id is not None and gen.bos_token_id is None:
        gen.bos_token_id = backbone.bos_token_id
    tau = pipo_confidence_threshold
    if tau is None:
        tau = pipo_fields.get("confidence_threshold")
        if tau is not None:
            notes.append(f"confidence threshold {tau} taken from the source config.")
    gen.pipo_confidence_threshold = DEFAULT_CONFIDENCE_THRESHOLD if tau is None else float(tau)
    # Our own generation config: with `_from_model_config` (as in files written by transformers from a model
    # config) transformers would rebuild it from config.json on load and drop the PIPO fields (τ).
    gen._from_model_config = False
    skeleton.generation_config = gen
    dst.mkdir(parents=True, exist_ok=True)
    description = (
        f"Converted with `pipo convert-reference` from the PIPO reference checkpoint layout "
        f"({'LoRA adapter merged into its base' if merged_info else style + ' config'})."
    )
    skeleton.save_pretrained(
        dst, state_dict=dict(renamed), max_shard_size=max_shard_size, model_card={"description": description}
    )
    for name in TOKENIZER_FILES:
        for folder in (src, config_dir):
            if (folder / name).is_file():
                shutil.copy2(folder / name, dst / name)
                break

    report = ConversionReport(
        destination=str(dst),
        source_keys=len(tensors),
        mapped={k: v for k, v in mapping.items() if v in renamed},
        ignored=sorted(ignored),
        dropped_tied=dropped_tied,
        compressor_type=ctype,
        tie_word_embeddings=tie,
        pad_token_id=pad,
        eos_token_ids=eos,
        config_style=style,
        merged_lora=merged_info,
        notes=notes,
    )
    if verify:
        _verify(dst, renamed)
    return report


def _verify(dst: Path, renamed: dict[str, torch.Tensor]) -> None:
    """Reload with our class: nothing missing or unexpected, and every parameter equals its source tensor."""
    from transformers_pipo import PipoForCausalLM

    model, info = PipoForCausalLM.from_pretrained(dst, output_loading_info=True, dtype="auto")
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                and v}
    if problems:
        raise ReferenceLayoutError(
            f"{dst}: reloading the converted checkpoint reported {problems}.",
            unexpected=problems.get("unexpected_keys", []), missing=problems.get("missing_keys", []),
        )
    state = model.state_dict()
    for key, tensor in renamed.items():
        if not torch.equal(state[key].to(tensor.dtype), tensor):
            raise RuntimeError(f"{dst}: reloaded tensor {key} differs from the source tensor.")
