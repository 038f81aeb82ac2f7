"""Configuration for PIPO (Pair-In, Pair-Out) models wrapping any decoder-only backbone.

This file is shipped as remote code by ``save_pretrained``: it must only import from ``transformers``/``torch``
and from sibling files with ``from .x import y``.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

COMPRESSOR_TYPES = ("linear", "mlp", "gated")
MTP_INIT_SCHEMES = ("native", "last_layer", "random")
MTP_FC_INIT_SCHEMES = ("hidden_only", "average", "random")
NORM_STYLES = ("one_plus_w", "w", "layernorm")


def _as_id_list(value) -> list[int]:
    """Normalise an ``eos_token_id``-like field (None, int or list) to a list of ints."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class PipoConfig(PreTrainedConfig):
    r"""Configuration of a [`PipoForCausalLM`]: a decoder backbone plus the PIPO compressor, MTP head and
    confidence head.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`):
            Config of the wrapped decoder-only model (anything `AutoModel` can build). Composite configs with a
            text sub-config (e.g. Qwen3.5 with vision) are reduced to their text config.
        compressor_type (`str`, defaults to `"mlp"`):
            How two token embeddings are folded into one latent: `"linear"`, `"mlp"` (the paper's runs) or
            `"gated"`.
        num_mtp_layers (`int`, defaults to 1):
            Number of MTP decoder layers. Only pair size 2 (one MTP layer) is implemented.
        pad_token_id (`int`):
            The PIPO PAD id (rejected-draft stand-in). Required by the model; must differ from every EOS id and lie
            inside the vocabulary.
        mtp_init (`str`, defaults to `"last_layer"`):
            How `from_backbone` initialises the MTP decoder layer: `"native"` (checkpoint `mtp.*` weights),
            `"last_layer"` (copy of the last full-attention backbone layer) or `"random"`.
        mtp_fc_init (`str`, defaults to `"hidden_only"`):
            Init of `mtp.fc`: `"hidden_only"` = `[0 | I]`, `"average"` = `[I/2 | I/2]`, `"random"` = normal init.
        confidence_hidden_size (`int`, *optional*):
            Width of the confidence head's hidden layer; defaults to the backbone hidden size.
        detach_confidence_inputs (`bool`, defaults to `True`):
            Stop the confidence loss from flowing into the backbone and MTP (DESIGN §1.6).
        mtp_loss_weight / confidence_loss_weight (`float`, default 1.0):
            Weights of the MTP cross-entropy and the confidence BCE in the training loss.
        loss_chunk_size (`int`, defaults to 2048):
            Tokens per LM-head chunk in the losses; bounds peak memory independently of sequence length.
        norm_style (`str`, *optional*):
            Flavour of the backbone's norm (`"one_plus_w"`, `"w"` or `"layernorm"`); recorded by the model so that
            converters know whether weights need a +1 shift.
    """

    model_type = "pipo"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3")}

    backbone_config: dict | PreTrainedConfig | None = None
    compressor_type: str = "mlp"
    num_mtp_layers: int = 1
    pad_token_id: int | None = None
    mtp_init: str = "last_layer"
    mtp_fc_init: str = "hidden_only"
    confidence_hidden_size: int | None = None
    detach_confidence_inputs: bool = True
    mtp_loss_weight: float = 1.0
    confidence_loss_weight: float = 1.0
    loss_chunk_size: int = 2048
    norm_style: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        backbone = self.backbone_config
        text = backbone.get_text_config(decoder=True) if backbone is not None else None
        if text is not None and text is not backbone:
            # A composite (e.g. vision-language) config: PIPO wraps its text decoder only.
            self.backbone_config = backbone = text
        if getattr(backbone, "tie_word_embeddings", False):
            # Tying is read from the top config (DESIGN §5.2), so mirror the backbone's choice.
            self.tie_word_embeddings = True
        self.validate_pipo()

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The backbone config is the text config: caches, generation defaults and resizing read it."""
        return self.backbone_config

    @property
    def hidden_size(self) -> int:
        return _backbone_hidden_size(self.backbone_config)

    @property
    def vocab_size(self) -> int:
        return self.backbone_config.vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        """All EOS ids of the backbone (it may declare a list)."""
        return _as_id_list(getattr(self.backbone_config, "eos_token_id", None))

    def validate_pipo(self) -> None:
        """Check PIPO-specific fields; every error names the offending field and value."""
        backbone = self.backbone_config
        if getattr(backbone, "is_encoder_decoder", False):
            raise ValueError(
                f"PipoConfig.backbone_config: PIPO needs a decoder-only backbone, got the encoder-decoder model_type "
                f"'{backbone.model_type}'."
            )
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if backbone.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(
                f"PipoConfig.backbone_config: model_type '{backbone.model_type}' has no causal-LM class in "
                "transformers, so it cannot serve as a PIPO backbone."
            )
        if backbone.model_type in _NON_CAUSAL_BACKBONES:
            raise ValueError(
                f"PipoConfig.backbone_config: model_type '{backbone.model_type}' is a bidirectional encoder; PIPO "
                "needs a causal decoder backbone."
            )
        if self.compressor_type not in COMPRESSOR_TYPES:
            raise ValueError(
                f"PipoConfig.compressor_type must be one of {COMPRESSOR_TYPES}, got {self.compressor_type!r}."
            )
        if isinstance(self.num_mtp_layers, bool) or not isinstance(self.num_mtp_layers, int) or self.num_mtp_layers != 1:
            raise ValueError(
                f"PipoConfig.num_mtp_layers must be 1 (pair size 2 uses exactly one MTP layer), got "
                f"{self.num_mtp_layers!r}."
            )
        if self.mtp_init not in MTP_INIT_SCHEMES:
            raise ValueError(f"PipoConfig.mtp_init must be one of {MTP_INIT_SCHEMES}, got {self.mtp_init!r}.")
        if self.mtp_fc_init not in MTP_FC_INIT_SCHEMES:
            raise ValueError(
                f"PipoConfig.mtp_fc_init must be one of {MTP_FC_INIT_SCHEMES}, got {self.mtp_fc_init!r}."
            )
        if self.norm_style is not None and self.norm_style not in NORM_STYLES:
            raise ValueError(f"PipoConfig.norm_style must be one of {NORM_STYLES}, got {self.norm_style!r}.")
        if self.confidence_hidden_size is not None and self.confidence_hidden_size <= 0:
            raise ValueError(
                f"PipoConfig.confidence_hidden_size must be positive, got {self.confidence_hidden_size!r}."
            )
        if self.loss_chunk_size <= 0:
            raise ValueError(f"PipoConfig.loss_chunk_size must be positive, got {self.loss_chunk_size!r}.")
        if self.pad_token_id is not None:
            pad = self.pad_token_id
            vocab = backbone.vocab_size
            if not isinstance(pad, int) or not 0 <= pad < vocab:
                raise ValueError(
                    f"PipoConfig.pad_token_id={pad!r} is outside the backbone vocabulary [0, {vocab})."
                )
            if pad in self.eos_token_ids:
                raise ValueError(
                    f"PipoConfig.pad_token_id={pad} equals an EOS id {self.eos_token_ids}: PAD marks a rejected "
                    "draft and must never stop generation. Add a dedicated PAD token (from_backbone does this)."
                )

    def require_pad_token(self) -> int:
        """Return the PAD id, raising a clear error when it is missing."""
        if self.pad_token_id is None:
            raise ValueError(
                "PipoConfig.pad_token_id is required: PIPO feeds PAD as the second token of a pair when a draft is "
                "rejected. Use PipoForCausalLM.from_backbone(..., tokenizer=tok), which adds one if needed."
            )
        return self.pad_token_id


# Backbones in transformers' causal-LM mapping that are really bidirectional encoders.
_NON_CAUSAL_BACKBONES = frozenset(
    {"bert", "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
     "ernie", "bert-generation", "electra", "rembert", "xmod", "megatron-bert", "big_bird", "qdqbert", "roc_bert",
     "modernbert"}
)


def _backbone_hidden_size(config: PreTrainedConfig) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"Cannot find the hidden size of backbone model_type '{config.model_type}'.")


if not __name__.startswith("transformers_pipo."):
    # Loaded as remote code (trust_remote_code=True): register the type, so later AutoConfig/AutoTokenizer calls on
    # PIPO folders in this process know "pipo" and never ask the trust-remote-code question again. (The package
    # registers its own classes on import.)
    AutoConfig.register("pipo", PipoConfig, exist_ok=True)


__all__ = ["PipoConfig"]
