"""Model cards (README.md) for PIPO checkpoints.

`PipoForCausalLM.save_pretrained` and `push_to_hub` call [`write_model_card`], so every saved or uploaded PIPO
model documents its base model, compressor, confidence threshold τ, training stages, measured commit rate (when
known) and how to load it with `trust_remote_code=True`.

Extra facts that the config cannot know (training stages, commit rate, datasets, license, ...) come from the dict
`model.pipo_model_card_info` and/or `save_pretrained(..., model_card={...})`; see [`CARD_INFO_KEYS`].

Shipped as remote code next to `modeling_pipo.py`: only `transformers`, `huggingface_hub` and the standard library.
"""

from __future__ import annotations

import os
import re

from huggingface_hub import ModelCard, ModelCardData

# Marks a README written by this module: such a card is regenerated on every save; any other README is kept.
CARD_MARKER = "<!-- transformers-pipo model card: regenerated on save; remove this line to keep your edits -->"
# The placeholder card transformers writes before an upload (replaced by ours).
_GENERIC_CARD_SNIPPETS = (
    "This model card has been automatically generated",
    "model that has been pushed on the Hub",
)
CARD_INFO_KEYS = {
    "base_model": "Hub id of the backbone (default: the backbone config's `_name_or_path`).",
    "training_stages": "list of stages, e.g. ['SFT (LoRA r=64, 1500 steps)', 'OPD (τ=0.95)'] (default: the "
    "config's `pipo_training_stages`, which `pipo train` appends to).",
    "commit_rate": "measured fraction of decode steps whose draft was committed (0..1).",
    "commit_rate_setting": "how the commit rate was measured (data set, τ, sampling).",
    "datasets": "list of training data sets (Hub ids).",
    "license": "license id, e.g. 'apache-2.0'.",
    "language": "language code(s).",
    "tags": "extra Hub tags.",
    "repo_id": "Hub id used in the loading snippet (default: the folder name).",
    "description": "free text placed under the title.",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_hub_id(value) -> bool:
    return isinstance(value, str) and bool(_HUB_ID.match(value)) and not os.path.exists(value)


def _card_info(model, info: dict | None) -> dict:
    merged = dict(getattr(model, "pipo_model_card_info", None) or {})
    merged.update(info or {})
    unknown = sorted(set(merged) - set(CARD_INFO_KEYS))
    if unknown:
        raise ValueError(f"Unknown model card field(s) {unknown}; known fields: {sorted(CARD_INFO_KEYS)}.")
    return merged


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def _threshold(model) -> tuple[float | None, str]:
    tau = getattr(getattr(model, "generation_config", None), "pipo_confidence_threshold", None)
    if tau is None:
        return None, "not set (the decoder's default applies)"
    tau = float(tau)
    if tau < 0:
        meaning = "every draft is committed (no gating)"
    elif tau >= 1:
        meaning = "no draft is committed; the MTP pass is skipped"
    else:
        meaning = f"a draft is committed when its confidence c ≥ {tau:g}, otherwise replaced by PAD"
    return tau, meaning


def build_model_card(model, info: dict | None = None, repo_id: str | None = None) -> str:
    """The README.md text (YAML metadata + markdown) describing a PIPO model."""
    info = _card_info(model, info)
    config = model.config
    backbone = config.get_text_config()
    base_model = info.get("base_model") or getattr(backbone, "_name_or_path", "") or ""
    repo = info.get("repo_id") or repo_id or "path/to/this-model"
    tau, tau_meaning = _threshold(model)

    tags = ["pipo", "multi-token-prediction", "custom_code", "text-generation"]
    tags += [t for t in (info.get("tags") or []) if t not in tags]
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        method = getattr(method, "value", method)
        if method:
            tags.append(str(method))
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model if _is_hub_id(base_model) else None,
        tags=tags,
        license=info.get("license"),
        datasets=info.get("datasets"),
        language=info.get("language"),
    )

    stages = info.get("training_stages") or getattr(config, "pipo_training_stages", None)
    if isinstance(stages, str):
        stages = [stages]
    commit = info.get("commit_rate")

    hidden = config.hidden_size
    try:
        n_total = model.num_parameters()
        n_heads = sum(
            p.numel() for name in ("compressor", "mtp", "confidence_head")
            for p in getattr(model, name).parameters()
        )
        params = f"{_fmt_params(n_total)} in total, of which {_fmt_params(n_heads)} in the PIPO heads"
    except Exception:  # a model without materialised parameters still gets a card
        params = "n/a"

    if _is_hub_id(base_model):
        base_link = f"[{base_model}](https://huggingface.co/{base_model})"
    else:  # a local folder is meaningless to a reader (and may leak a user's paths): never print it
        base_link = "a local checkpoint (not on the Hub)" if base_model else "unknown"
    title = repo.split("/")[-1] if repo != "path/to/this-model" else "PIPO model"
    lines = [CARD_MARKER, "", f"# {title}", ""]
    if info.get("description"):
        lines += [str(info["description"]), ""]
    lines += [
        "A **PIPO (Pair-In, Pair-Out)** model: a decoder-only LM whose backbone reads one latent per *pair* of tokens "
        "(two token embeddings folded by a learned compressor) and emits two tokens per step: token1 from the LM head "
        "and token2 from a one-layer MTP head, kept only when a confidence head trusts it (otherwise a PAD stand-in "
        "is emitted and removed from the text).",
        "",
        "## Model details",
        "",
        "| | |",
        "|---|---|",
        f"| Base model | {base_link} |",
        f"| Backbone | `{backbone.model_type}`, {backbone.num_hidden_layers} layers, hidden {hidden}, "
        f"vocabulary {backbone.vocab_size}, {'tied' if config.tie_word_embeddings else 'untied'} embeddings |",
        f"| Compressor | `{config.compressor_type}` |",
        f"| MTP head | one `{backbone.model_type}` decoder layer (full attention), init `{config.mtp_init}` |",
        f"| Confidence threshold τ | {'%g' % tau if tau is not None else 'default'}: {tau_meaning} |",
        f"| PAD id | {config.pad_token_id} (input-only stand-in for a rejected draft; never an EOS) |",
        f"| Parameters | {params} |",
        "| Training stages | "
        + ("; ".join(f"{i + 1}. {s}" for i, s in enumerate(stages)) if stages else "not recorded")
        + " |",
        "| Measured commit rate | "
        + (f"{float(commit):.1%}" + (f" ({info['commit_rate_setting']})" if info.get("commit_rate_setting") else "")
           if commit is not None else "not measured")
        + " |",
    ]
    if quant is not None:
        lines.append(f"| Quantization | `{method}` (compressor and confidence head kept in higher precision) |")
    lines += [
        "",
        "## How to use",
        "",
        "The modelling code ships with the weights (`configuration_pipo.py`, `modeling_pipo.py`, "
        "`generation_pipo.py`), so `trust_remote_code=True` is all that is needed; with the `transformers-pipo` "
        "package installed and imported, the flag is not required.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        'inputs = tokenizer("The capital of France is", return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=64, do_sample=False)  # PIPO decoding, two tokens per step",
        "print(tokenizer.decode(out[0], skip_special_tokens=True))",
        "```",
        "",
        "Change the draft gate per call with `model.generate(..., pipo_confidence_threshold=0.9)`; "
        "`pipo_decoding=False` decodes one token per step for comparison.",
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines)


def is_replaceable_card(text: str) -> bool:
    """True for a README we wrote earlier, or for transformers' generic upload placeholder."""
    return CARD_MARKER in text or any(snippet in text for snippet in _GENERIC_CARD_SNIPPETS)


def write_model_card(model, save_directory, info: dict | None = None, repo_id: str | None = None) -> str | None:
    """Write `README.md` into `save_directory` unless a README written by someone else is already there.

    Returns the path written, or None when an existing (user-written) README was kept.
    """
    path = os.path.join(os.fspath(save_directory), "README.md")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            if not is_replaceable_card(handle.read()):
                return None
    if repo_id is None and not (info or {}).get("repo_id"):
        repo_id = os.path.basename(os.path.normpath(os.fspath(save_directory))) or None
    card = ModelCard(build_model_card(model, info, repo_id=repo_id))
    card.save(path)
    return path


class PipoModelCardMixin:
    """Makes `save_pretrained` and `push_to_hub` of a PIPO model write the PIPO card (put before `PreTrainedModel`
    in the bases)."""

    def save_pretrained(self, save_directory, *args, model_card: dict | bool | None = None, **kwargs):
        """`PreTrainedModel.save_pretrained`, then a PIPO README.md model card.

        `model_card`: extra card fields (training stages, commit rate, ...) merged over `self.pipo_model_card_info`
        (see [`CARD_INFO_KEYS`]); `False` writes no card. A README.md not written by PIPO is never overwritten.
        """
        result = super().save_pretrained(save_directory, *args, **kwargs)
        is_main = args[0] if args else kwargs.get("is_main_process", True)
        if is_main and model_card is not False and os.path.isdir(save_directory):
            write_model_card(self, save_directory, model_card if isinstance(model_card, dict) else None)
        return result

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # Both upload paths (push_to_hub, save_pretrained(push_to_hub=True)) write transformers' generic card just
        # before this call; replace it by the PIPO card, then upload through huggingface_hub unchanged.
        write_model_card(self, working_dir, repo_id=repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)


__all__ = [
    "build_model_card",
    "write_model_card",
    "is_replaceable_card",
    "PipoModelCardMixin",
    "CARD_INFO_KEYS",
    "CARD_MARKER",
]
