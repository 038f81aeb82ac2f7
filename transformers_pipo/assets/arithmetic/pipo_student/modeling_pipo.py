"""PIPO (Pair-In, Pair-Out) model for any Hugging Face decoder-only backbone.

Pair-in: two token embeddings are folded by a compressor into one latent, so the backbone runs over half as many
positions. Pair-out: from each backbone hidden state the shared LM head predicts token1, and a one-layer MTP head
(a decoder layer of the backbone's own class, with its own cache) predicts token2 from [E(token1); h]. A confidence
head scores token2; generation replaces low-confidence drafts by PAD.

Shipped as remote code by ``save_pretrained``; only ``from .x import y`` links it to its siblings.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModel, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import ModelOutput, logging

from .configuration_pipo import PipoConfig, _as_id_list, _backbone_hidden_size
from .generation_pipo import DEFAULT_CONFIDENCE_THRESHOLD, pipo_generate_entry
from .modelcard_pipo import write_model_card

IGNORE_INDEX = -100
logger = logging.get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PipoCausalLMOutput(ModelOutput):
    """Output of [`PipoForCausalLM.forward`].

    Latent `j` holds tokens `(x[2j], x[2j+1])` of `pair_input_ids`. `logits[:, j]` predicts `x[2j+2]` (token1) and
    `mtp_logits[:, j]` predicts `x[2j+3]` (token2), for `j < L-1`.

    Args:
        loss: `backbone_loss + mtp_loss_weight * mtp_loss + confidence_loss_weight * confidence_loss`.
        backbone_loss: mean cross-entropy of token1 predictions over labelled positions.
        mtp_loss: mean cross-entropy of token2 predictions over labelled positions.
        confidence_loss: mean BCE of the confidence head against `p_MTP(gold token2)`.
        logits: `[B, L, V]` token1 logits for every latent (None with `return_logits=False`).
        mtp_logits: `[B, L-1, V]` token2 logits (None with `return_logits=False`).
        confidence_logits: `[B, L-1]` draft-confidence logits (sigmoid gives `c`).
        cache: the backbone cache (one entry per latent).
        mtp_cache: the MTP layer's own cache.
        hidden_states: `[B, L, H]` backbone outputs after the final norm.
        mtp_hidden_states: `[B, L-1, H]` MTP outputs after the MTP norm.
        pair_input_ids / pair_labels / pair_attention_mask: the inputs after the parity rules (PAD inserted after an
            odd prompt and at the end of odd rows); identical to the inputs when they were already aligned.
    """

    loss: torch.FloatTensor | None = None
    backbone_loss: torch.FloatTensor | None = None
    mtp_loss: torch.FloatTensor | None = None
    confidence_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mtp_logits: torch.FloatTensor | None = None
    confidence_logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    mtp_cache: Cache | None = None
    hidden_states: torch.FloatTensor | None = None
    mtp_hidden_states: torch.FloatTensor | None = None
    pair_input_ids: torch.LongTensor | None = None
    pair_labels: torch.LongTensor | None = None
    pair_attention_mask: torch.LongTensor | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Parity rules (DESIGN §1.2)
# ----------------------------------------------------------------------------------------------------------------------


def align_row(ids: list[int], labels: list[int] | None, pad_token_id: int) -> tuple[list[int], list[int] | None]:
    """Apply the PIPO parity rules to one unpadded row.

    A PAD (label -100) is inserted where the first labelled token sits at an odd index, so no pair straddles the
    prompt/response boundary, and one more PAD is appended when the total length is odd. PADs only ever land in
    odd (draft) slots.
    """
    ids = list(ids)
    labels = None if labels is None else list(labels)
    if labels is not None:
        if len(labels) != len(ids):
            raise ValueError(f"labels length {len(labels)} does not match input length {len(ids)}.")
        start = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
        if start % 2 == 1 and start < len(ids):
            ids.insert(start, pad_token_id)
            labels.insert(start, IGNORE_INDEX)
    if len(ids) % 2 == 1:
        ids.append(pad_token_id)
        if labels is not None:
            labels.append(IGNORE_INDEX)
    return ids, labels


def pair_layout(
    input_ids: torch.LongTensor,
    labels: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    pad_token_id: int,
) -> tuple[torch.LongTensor, torch.LongTensor | None, torch.Tensor | None]:
    """Return `(input_ids, labels, attention_mask)` laid out in whole pairs.

    Inputs that already satisfy the rules are returned unchanged (no copy). Otherwise every row's real tokens are
    re-aligned with [`align_row`] and the batch is re-padded in whole pairs on the side it was padded on.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}.")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match input_ids shape {tuple(input_ids.shape)}."
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape "
            f"{tuple(input_ids.shape)}."
        )
    batch, length = input_ids.shape
    if length == 0:
        raise ValueError("input_ids is empty: PIPO needs at least one token.")
    mask_all_ones = attention_mask is None or bool(attention_mask.all())
    if length % 2 == 0 and mask_all_ones:
        if labels is None:
            return input_ids, labels, attention_mask
        starts = _first_label_index(labels)
        if bool((starts % 2 == 0).all()):
            return input_ids, labels, attention_mask

    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    left_padded = bool((~mask[:, 0]).any())
    rows, row_labels = [], []
    for b in range(batch):
        keep = mask[b]
        ids, lab = align_row(
            input_ids[b][keep].tolist(), None if labels is None else labels[b][keep].tolist(), pad_token_id
        )
        rows.append(ids)
        row_labels.append(lab)
    width = max(len(r) for r in rows)
    out_ids = input_ids.new_full((batch, width), pad_token_id)
    out_mask = torch.zeros((batch, width), dtype=torch.long, device=input_ids.device)
    out_labels = None if labels is None else labels.new_full((batch, width), IGNORE_INDEX)
    for b, ids in enumerate(rows):
        sl = slice(width - len(ids), width) if left_padded else slice(0, len(ids))
        out_ids[b, sl] = torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device)
        out_mask[b, sl] = 1
        if out_labels is not None:
            out_labels[b, sl] = torch.tensor(row_labels[b], dtype=labels.dtype, device=labels.device)
    return out_ids, out_labels, (None if bool(out_mask.all()) else out_mask)


def _first_label_index(labels: torch.LongTensor) -> torch.LongTensor:
    """Index of the first labelled token per row (row length when none is labelled)."""
    valid = labels != IGNORE_INDEX
    idx = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    return torch.where(valid, idx, labels.shape[1]).min(dim=1).values


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


class PipoLinearCompressor(nn.Module):
    """`z = W [a; b] + c`; identity-like init `W = [I | I]`, `c = 0` gives `z = a + b`."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(2 * hidden_size, hidden_size, bias=True)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.linear(pairs)

    def init_identity_like(self) -> None:
        eye = torch.eye(self.hidden_size, device=self.linear.weight.device, dtype=self.linear.weight.dtype)
        init.copy_(self.linear.weight, torch.cat([eye, eye], dim=1))
        init.zeros_(self.linear.bias)


class PipoMLPCompressor(nn.Module):
    """`z = W2 SiLU(W1 [a; b] + c1) + c2`; init `W1 = I`, `W2 = [I | I]` gives `z = SiLU(a) + SiLU(b)`."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden_size, 2 * hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(2 * hidden_size, hidden_size, bias=True),
        )

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.mlp(pairs)

    def init_identity_like(self) -> None:
        first, last = self.mlp[0], self.mlp[2]
        kw = {"device": first.weight.device, "dtype": first.weight.dtype}
        init.copy_(first.weight, torch.eye(2 * self.hidden_size, **kw))
        init.zeros_(first.bias)
        eye = torch.eye(self.hidden_size, **kw)
        init.copy_(last.weight, torch.cat([eye, eye], dim=1))
        init.zeros_(last.bias)


class PipoGatedCompressor(nn.Module):
    """`z = sigmoid(alpha(a)) a + sigmoid(beta(b)) b + delta(a - b)`.

    Unlike the reference (random `delta`), `delta` starts at zero, so the init is `z = (a + b) / 2` exactly.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.alpha = nn.Linear(hidden_size, 1, bias=True)
        self.beta = nn.Linear(hidden_size, 1, bias=True)
        self.delta = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        a, b = pairs.split(self.hidden_size, dim=-1)
        return torch.sigmoid(self.alpha(a)) * a + torch.sigmoid(self.beta(b)) * b + self.delta(a - b)

    def init_identity_like(self) -> None:
        init.zeros_(self.alpha.weight)
        init.zeros_(self.alpha.bias)
        init.zeros_(self.beta.weight)
        init.zeros_(self.beta.bias)
        init.zeros_(self.delta.weight)


COMPRESSOR_CLASSES: dict[str, type[nn.Module]] = {
    "linear": PipoLinearCompressor,
    "mlp": PipoMLPCompressor,
    "gated": PipoGatedCompressor,
}


def _norm_template(body: nn.Module) -> nn.Module:
    """The backbone's final norm module (its class and eps are reused for every new PIPO norm)."""
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f", "final_norm"):
        module = getattr(body, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"Cannot find the final norm of backbone {type(body).__name__}; PIPO reuses its class for the new heads."
    )


def make_norm(template: nn.Module, size: int) -> nn.Module:
    """A new norm of `size` features, of the same class and epsilon as `template`."""
    eps = None
    for attr in ("variance_epsilon", "eps", "epsilon"):
        if isinstance(getattr(template, attr, None), float):
            eps = getattr(template, attr)
            break
    cls = type(template)
    try:
        return cls(size, eps=eps) if eps is not None else cls(size)
    except TypeError:
        return cls(size)


def norm_style_of(template: nn.Module) -> str:
    """Classify a norm: LayerNorm, zero-centred RMSNorm (`x * (1 + w)`) or plain RMSNorm (`x * w`)."""
    if isinstance(template, nn.LayerNorm) or getattr(template, "bias", None) is not None:
        return "layernorm"
    with torch.device("cpu"), torch.no_grad():
        probe = make_norm(template, 4)
        if probe.weight is not None:
            probe.weight.zero_()
        out = probe(torch.ones(1, 4))
    return "one_plus_w" if bool(out.abs().sum() > 0) else "w"


def _decoder_layers(body: nn.Module, num_layers: int) -> nn.ModuleList:
    for child in body.children():
        if isinstance(child, nn.ModuleList) and len(child) == num_layers:
            return child
    raise ValueError(f"Cannot find the decoder layer list of backbone {type(body).__name__}.")


def _mtp_body_config(backbone_config):
    """Backbone config reduced to one full-attention layer: the MTP layer's own config and cache layout."""
    cfg = copy.deepcopy(backbone_config)
    n = cfg.num_hidden_layers
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"]
    for name in ("mlp_layer_types",):
        value = getattr(cfg, name, None)
        if isinstance(value, list) and len(value) == n:
            setattr(cfg, name, value[-1:])
    if getattr(cfg, "sliding_window", None) is not None:
        cfg.sliding_window = None
    if getattr(cfg, "use_sliding_window", None):
        cfg.use_sliding_window = False
    return cfg


class PipoMTPHead(nn.Module):
    """MTP head: `fc([norm_e(E(token1)); norm_h(h)])` → one decoder layer of the backbone's class → final norm.

    The layer runs inside a one-layer instance of the backbone's own model class (so masks, RoPE, learned positions
    and caches behave exactly as in the backbone), forced to full attention. That instance's children are
    registered directly on this module, giving checkpoint keys `mtp.layers.0.*` and `mtp.norm.*` as in the
    reference; its (unused) input embedding is dropped.
    """

    def __init__(self, backbone_config, norm_template: nn.Module):
        super().__init__()
        hidden = _backbone_hidden_size(backbone_config)
        self.body_config = _mtp_body_config(backbone_config)
        body = AutoModel.from_config(self.body_config)
        embedding = body.get_input_embeddings()
        for name, child in list(body.named_children()):
            if child is embedding:
                setattr(body, name, None)
            else:
                self.add_module(name, child)
        if any(True for _ in body.named_parameters(recurse=False)):
            raise ValueError(f"{type(body).__name__} holds parameters outside submodules; unsupported as MTP body.")
        object.__setattr__(self, "_body", body)  # not a submodule: its children are registered above
        # Tensor parallelism (`tp_plan="auto"`): the MTP layer is sharded like the backbone's layers (transformers
        # gathers a child module's `_tp_plan` under its name, giving `mtp.layers.*` entries).
        backbone_plan = getattr(backbone_config, "base_model_tp_plan", None) or {}
        self._tp_plan = {k: v for k, v in backbone_plan.items() if k.startswith("layers.")}
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = make_norm(norm_template, hidden)
        self.pre_fc_norm_hidden = make_norm(norm_template, hidden)
        self.hidden_size = hidden

    def train(self, mode: bool = True):
        super().train(mode)
        self._body.train(mode)
        return self

    def decoder_layer(self) -> nn.Module:
        return _decoder_layers(self, 1)[0]

    def init_fc(self, scheme: str) -> None:
        if scheme == "random":
            return
        h = self.hidden_size
        kw = {"device": self.fc.weight.device, "dtype": self.fc.weight.dtype}
        eye = torch.eye(h, **kw)
        left = torch.zeros(h, h, **kw) if scheme == "hidden_only" else 0.5 * eye
        right = eye if scheme == "hidden_only" else 0.5 * eye
        init.copy_(self.fc.weight, torch.cat([left, right], dim=1))

    def forward(
        self,
        token1_embeds: torch.Tensor,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        u = self.fc(torch.cat([self.pre_fc_norm_embedding(token1_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        out = self._body(
            inputs_embeds=u,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        return out.last_hidden_state

    def decode_step(
        self,
        token1_embeds: torch.Tensor,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache,
    ) -> torch.Tensor:
        """One cached decode position, calling the decoder layer directly (no one-layer model forward).

        Same computation as `forward` for bodies whose forward is `rotary embedding -> layers -> norm` (every
        rotary backbone: Llama, Mistral, Qwen2/3/3.5, ...): the layer gets its cache, its position embeddings and
        the mask from `create_causal_mask`, without the model-level wrappers. Other bodies (learned positions, e.g.
        GPT-2) take the full `forward`.
        """
        if not self.uses_lean_step():
            return self.forward(token1_embeds, hidden, attention_mask, position_ids, cache=cache, use_cache=True)
        u = self.fc(torch.cat([self.pre_fc_norm_embedding(token1_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        mask = decode_causal_mask(config=self.body_config, inputs_embeds=u, attention_mask=attention_mask, cache=cache,
                                  position_ids=position_ids)
        position_embeddings = self.rotary_emb(u, position_ids)
        out = self.decoder_layer()(u, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
                                   position_embeddings=position_embeddings)
        return self.norm(out)

    def uses_lean_step(self) -> bool:
        """Whether `decode_step` calls the layer directly (rotary bodies) or the full one-layer forward."""
        import inspect

        lean = self.__dict__.get("_lean_cached")
        if lean is None:
            layer = self.decoder_layer()
            lean = (
                isinstance(getattr(self, "rotary_emb", None), nn.Module)
                and isinstance(getattr(self, "norm", None), nn.Module)
                and "position_embeddings" in inspect.signature(layer.forward).parameters
                and getattr(self.body_config, "layer_types", ["full_attention"])[0] == "full_attention"
            )
            self.__dict__["_lean_cached"] = lean
        return lean


class PipoConfidenceHead(nn.Module):
    """`norm(2H) → Linear(2H, Hc, no bias) → SiLU → Linear(Hc, 1, no bias)` on `[h; m]`; gives a draft logit."""

    def __init__(self, hidden_size: int, inner_size: int, norm_template: nn.Module):
        super().__init__()
        self.norm = make_norm(norm_template, 2 * hidden_size)
        self.fc1 = nn.Linear(2 * hidden_size, inner_size, bias=False)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(inner_size, 1, bias=False)

    def forward(self, hidden: torch.Tensor, mtp_hidden: torch.Tensor) -> torch.Tensor:
        x = torch.cat([hidden, mtp_hidden], dim=-1).to(self.fc1.weight.dtype)
        return self.fc2(self.act(self.fc1(self.norm(x)))).squeeze(-1)


def _token_nll(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, labels, reduction="none")


def chunked_nll(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, chunk_size: int) -> torch.Tensor:
    """Per-token negative log-likelihood of `labels` under `lm_head(hidden)`, computed `chunk_size` rows at a time.

    Each chunk is checkpointed, so neither forward nor backward ever holds more than `[chunk_size, V]` logits:
    peak memory does not grow with sequence length × vocabulary.
    """
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in lm_head.parameters())):
            pieces.append(checkpoint(_token_nll, h, y, lm_head, use_reentrant=False))
        else:
            pieces.append(_token_nll(h, y, lm_head))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


class PipoPreTrainedModel(PreTrainedModel):
    config: PipoConfig
    config_class = PipoConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keep_in_fp32_modules = ["compressor", "confidence_head"]
    # The non-strict list only upcasts under fp16; the strict one also keeps these heads fp32 when loading in bf16,
    # matching from_backbone (which builds them in fp32), so a bf16 save -> load round trip is lossless.
    _keep_in_fp32_modules_strict = ["compressor", "confidence_head"]

    def _init_weights(self, module: nn.Module) -> None:
        backbone = getattr(self, "model", None)
        if isinstance(module, tuple(COMPRESSOR_CLASSES.values())):
            module.init_identity_like()
        elif isinstance(module, PipoMTPHead):
            module.init_fc(self.config.mtp_fc_init)
        elif isinstance(backbone, PreTrainedModel):
            # New norms and layers use the backbone's own init (e.g. zero weights for (1 + w) RMSNorms).
            backbone._init_weights(module)
        else:
            super()._init_weights(module)


class PipoForCausalLM(PipoPreTrainedModel, GenerationMixin):
    """A decoder backbone wrapped with PIPO's compressor, MTP head and confidence head.

    `forward` is the training computation (DESIGN §2.3); `generate` decodes two tokens per backbone step.
    """

    # Tensor parallelism: the LM head is sharded over the vocabulary and gathers its output (as in the backbones'
    # own *ForCausalLM); the backbone's plan comes from its config, the MTP layer's from `PipoMTPHead`.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: PipoConfig):
        super().__init__(config)
        config.require_pad_token()
        bb = config.get_text_config()
        hidden = _backbone_hidden_size(bb)
        self.model = AutoModel.from_config(bb)
        template = _norm_template(self.model)
        if config.norm_style is None:
            config.norm_style = norm_style_of(template)
        self.lm_head = nn.Linear(hidden, bb.vocab_size, bias=False)
        self.compressor = COMPRESSOR_CLASSES[config.compressor_type](hidden)
        self.mtp = PipoMTPHead(bb, template)
        self.confidence_head = PipoConfidenceHead(hidden, config.confidence_hidden_size or hidden, template)
        embedding_name = next(n for n, m in self.model.named_children() if m is self.model.get_input_embeddings())
        self._tied_weights_keys = {"lm_head.weight": f"model.{embedding_name}.weight"}
        # Units `device_map="auto"` never splits (and FSDP's transformer auto-wrap shards as one): each PIPO head runs
        # on one device, since its forward concatenates / normalises tensors that must share one. Only classes present
        # in this model (FSDP's auto-wrap rejects absent ones); `post_init` adds the backbone's decoder layer class.
        self._no_split_modules = [type(self.compressor).__name__, type(self.mtp).__name__,
                                  type(self.confidence_head).__name__]
        self.post_init()
        if self.generation_config is not None:
            # A PIPO generation config of its own: `_from_model_config` would make loading drop the PIPO fields.
            self.generation_config._from_model_config = False
            self.generation_config.pad_token_id = config.pad_token_id
            self.generation_config.pipo_confidence_threshold = DEFAULT_CONFIDENCE_THRESHOLD

    # -- transformers plumbing -----------------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        # The MTP layer runs in a one-layer body that is not a registered sub-model, so transformers does not reach
        # its config: mirror the backbone's implementation onto it.
        self.mtp.body_config._attn_implementation_internal = self.model.config._attn_implementation

    @property
    def pad_token_id(self) -> int:
        return self.config.require_pad_token()

    # -- PIPO building blocks (shared by forward and generation) ------------------------------------------------------

    def embed_pairs(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Fold `[B, 2k]` token ids into `[B, k, H]` latents with the compressor."""
        batch, length = input_ids.shape
        if length % 2:
            raise ValueError(f"embed_pairs needs an even number of tokens, got {length}.")
        embeds = self.get_input_embeddings()(input_ids)
        pairs = embeds.reshape(batch, length // 2, 2 * embeds.shape[-1])
        weight_dtype = next(self.compressor.parameters()).dtype
        return self.compressor(pairs.to(weight_dtype)).to(embeds.dtype)

    def run_backbone(
        self,
        latents: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        """Backbone body over latents; returns the post-norm hidden states `h`.

        A one-latent cached decode step of a standard rotary body goes through `lean_decode_step` (the same layers,
        masks and rotary embedding, without the model-level wrappers; see `lean_body_plan`)."""
        if use_cache and cache is not None and latents.shape[1] == 1 and not torch.compiler.is_compiling():
            plan = lean_body_plan(self.model)
            if plan is not None:
                return lean_decode_step(self.model, plan, latents, attention_mask, position_ids, cache)
        out = self.model(
            inputs_embeds=latents,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        return out.last_hidden_state

    def run_mtp(
        self,
        token1: torch.LongTensor,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        """MTP head for token1 ids `[B, n]` and backbone hiddens `[B, n, H]`; returns post-norm `m`."""
        return self.mtp(
            self.get_input_embeddings()(token1),
            hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )

    def confidence_logits(self, hidden: torch.Tensor, mtp_hidden: torch.Tensor) -> torch.Tensor:
        """Draft-confidence logits `[B, n]` (inputs detached when `config.detach_confidence_inputs`)."""
        if self.config.detach_confidence_inputs:
            hidden, mtp_hidden = hidden.detach(), mtp_hidden.detach()
        return self.confidence_head(hidden, mtp_hidden).float()

    def mtp_step(
        self,
        token1: torch.LongTensor,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache,
    ) -> torch.Tensor:
        """One cached MTP decode position (`token1` `[B, 1]`, `hidden` `[B, 1, H]`); same result as `run_mtp`."""
        return self.mtp.decode_step(self.get_input_embeddings()(token1), hidden, attention_mask, position_ids, cache)

    def new_mtp_cache(self, max_cache_len: int | None = None) -> Cache:
        """A fresh cache for the MTP layer (independent of the backbone cache): dynamic, or static with
        `max_cache_len` positions."""
        if max_cache_len is None:
            return DynamicCache(config=self.mtp.body_config)
        from transformers.cache_utils import StaticCache

        return StaticCache(config=self.mtp.body_config, max_cache_len=max_cache_len)

    # -- training forward -----------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_logits: bool = True,
        mtp_cache: Cache | None = None,
        **kwargs,
    ) -> PipoCausalLMOutput:
        r"""Training computation of DESIGN §2.3 over token ids.

        Args:
            input_ids: `[B, T]` token ids. Odd rows and odd prompt/response boundaries are fixed with PAD.
            attention_mask: `[B, T]` batch-padding mask (left or right padding).
            position_ids: optional latent positions `[B, L]`; token-level positions are rejected.
            cache / mtp_cache: optional caches for the backbone and MTP layer (filled when `use_cache`).
            labels: `[B, T]` **unshifted** labels (`labels[t] = x[t]` on trained tokens, -100 elsewhere).
            return_logits: set False to skip materialising `[B, L, V]` logits when only the losses are needed.
        """
        if input_ids is None:
            raise ValueError("PipoForCausalLM.forward needs input_ids (pairs are built from token ids).")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("PipoForCausalLM.forward does not take inputs_embeds; pass input_ids.")
        pad = self.pad_token_id
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"input_ids contain ids outside the vocabulary [0, {self.config.vocab_size}): "
                f"min {int(input_ids.min())}, max {int(input_ids.max())}."
            )
        input_ids, labels, attention_mask = pair_layout(input_ids, labels, attention_mask, pad)
        batch, length = input_ids.shape
        n_lat = length // 2
        pair_mask = None if attention_mask is None else attention_mask[:, 0::2].long()
        if attention_mask is not None and bool((attention_mask[:, 1::2].bool() & ~attention_mask[:, 0::2].bool()).any()):
            raise ValueError("attention_mask marks a pair whose first token is padding but second is not.")
        if position_ids is not None:
            if position_ids.shape[-1] != n_lat:
                raise ValueError(
                    f"position_ids must index latents (length {n_lat}), got length {position_ids.shape[-1]}; "
                    "token-level positions do not apply to the compressed sequence."
                )
        else:
            position_ids = latent_positions(pair_mask, batch, n_lat, input_ids.device, cache)
        use_cache = bool(use_cache)

        latents = self.embed_pairs(input_ids)
        hidden = self.run_backbone(latents, pair_mask, position_ids, cache=cache, use_cache=use_cache)

        mtp_hidden = conf_logits = None
        if n_lat > 1:
            mtp_mask = None if pair_mask is None else pair_mask[:, :-1] * pair_mask[:, 1:]
            if use_cache and mtp_cache is None:
                mtp_cache = self.new_mtp_cache()
            mtp_hidden = self.run_mtp(
                input_ids[:, 2::2], hidden[:, :-1], mtp_mask, position_ids[..., :-1], cache=mtp_cache,
                use_cache=use_cache,
            )
            conf_logits = self.confidence_logits(hidden[:, :-1], mtp_hidden)

        logits = mtp_logits = None
        if return_logits:
            logits = self.lm_head(hidden)
            mtp_logits = None if mtp_hidden is None else self.lm_head(mtp_hidden)

        loss = backbone_loss = mtp_loss = confidence_loss = None
        if labels is not None:
            backbone_loss, mtp_loss, confidence_loss = self.pipo_losses(hidden, mtp_hidden, conf_logits, labels)
            loss = (
                backbone_loss
                + self.config.mtp_loss_weight * mtp_loss
                + self.config.confidence_loss_weight * confidence_loss
            )

        return PipoCausalLMOutput(
            loss=loss,
            backbone_loss=backbone_loss,
            mtp_loss=mtp_loss,
            confidence_loss=confidence_loss,
            logits=logits,
            mtp_logits=mtp_logits,
            confidence_logits=conf_logits,
            cache=cache if use_cache else None,
            mtp_cache=mtp_cache if use_cache else None,
            hidden_states=hidden,
            mtp_hidden_states=mtp_hidden,
            pair_input_ids=input_ids,
            pair_labels=labels,
            pair_attention_mask=attention_mask,
        )

    def pipo_losses(
        self,
        hidden: torch.Tensor,
        mtp_hidden: torch.Tensor | None,
        conf_logits: torch.Tensor | None,
        labels: torch.LongTensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backbone CE (target `labels[2j+2]`), MTP CE (target `labels[2j+3]`) and confidence BCE.

        Each is a mean over its own labelled positions (zero, still attached to the graph, when there are none).
        The BCE target is `p_MTP(gold)` taken from the MTP cross-entropy, detached. PAD is never a target (DESIGN
        §1.1): labels equal to the PAD id are ignored, so no head learns to emit PAD.
        """
        labels = labels.masked_fill(labels == self.pad_token_id, IGNORE_INDEX)
        chunk = self.config.loss_chunk_size
        zero = hidden.sum() * 0.0
        tok1_labels = labels[:, 2::2]
        hb = hidden[:, : tok1_labels.shape[1]]
        valid = tok1_labels != IGNORE_INDEX
        if bool(valid.any()):
            backbone_loss = chunked_nll(hb[valid], tok1_labels[valid], self.lm_head, chunk).mean()
        else:
            backbone_loss = zero

        if mtp_hidden is None:
            return backbone_loss, zero, zero
        tok2_labels = labels[:, 3::2]
        valid2 = tok2_labels != IGNORE_INDEX
        if bool(valid2.any()):
            nll = chunked_nll(mtp_hidden[valid2], tok2_labels[valid2], self.lm_head, chunk)
            mtp_loss = nll.mean()
            target = torch.exp(-nll.detach()).clamp(0.0, 1.0)
            confidence_loss = F.binary_cross_entropy_with_logits(conf_logits[valid2].float(), target)
        else:
            # Ghost terms keep every head in the graph (DDP/ZeRO need a gradient on every rank).
            mtp_loss = mtp_hidden.sum() * 0.0
            confidence_loss = conf_logits.sum() * 0.0
        return backbone_loss, mtp_loss, confidence_loss

    # -- generation -------------------------------------------------------------------------------------------------------

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """PIPO decoding by default (two tokens per backbone step); see `generation_pipo.pipo_generate`.

        `pipo_decoding=False` decodes one token per full uncached forward (for comparison); assisted decoding and
        beam search are rejected with a clear error in PIPO mode.
        """
        return pipo_generate_entry(self, super().generate, inputs, generation_config, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """Token-by-token fallback (`pipo_decoding=False`): every step re-reads the whole sequence without a cache,
        because appending one token changes the last pair's latent."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}

    # -- model card -------------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, model_card: dict | bool | None = None, **kwargs):
        """`PreTrainedModel.save_pretrained`, then a PIPO README.md model card (see `modelcard_pipo`).

        `model_card`: extra card fields (training stages, commit rate, ...) merged over `self.pipo_model_card_info`;
        `False` writes no card. A README.md not written by PIPO is never overwritten.
        """
        # FSDP2 (`fully_shard`) swaps the instance's class for a generated `FSDP<Name>(FSDPModule, <Name>)` defined in
        # torch; remote-code saving copies the file of `type(self)`, so save as the wrapped class itself (the state
        # dict the caller passes is already gathered) and the folder ships modeling_pipo.py with a PIPO `auto_map`.
        sharded_class = type(self)
        bases = sharded_class.__bases__
        if len(bases) == 2 and bases[0].__name__ in ("FSDPModule", "ReplicateModule"):
            self.__class__ = bases[1]
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = sharded_class
        is_main = args[0] if args else kwargs.get("is_main_process", True)
        if is_main and model_card is not False and os.path.isdir(save_directory):
            write_model_card(self, save_directory, model_card if isinstance(model_card, dict) else None)
        return result

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # Both upload paths (push_to_hub, save_pretrained(push_to_hub=True)) write transformers' generic card just
        # before this call; replace it by the PIPO card, then upload through huggingface_hub unchanged.
        write_model_card(self, working_dir, repo_id=repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    @classmethod
    def from_backbone(
        cls,
        model_or_path,
        tokenizer=None,
        *,
        pad_token_id: int | None = None,
        pad_token: str = "<|pipo_pad|>",
        compressor_type: str = "mlp",
        mtp_init: str | None = None,
        mtp_fc_init: str = "hidden_only",
        confidence_threshold: float = 0.95,
        return_tokenizer: bool = False,
        backbone_kwargs: dict | None = None,
        **config_kwargs,
    ):
        """Wrap a pretrained `*ForCausalLM` (a model object or a path/Hub id) as a PIPO model.

        The backbone body and LM head are reused as they are (bit-identical; a model object is shared, not copied).
        The compressor gets its identity-like init; the MTP layer comes from the checkpoint's native `mtp.*` weights
        when present (Qwen3.5), else from a copy of the last full-attention backbone layer (`mtp_init`); the
        confidence head starts near `c = 0.5`.

        PAD and EOS (PIPO's PAD marks a rejected draft: it is never emitted and must never stop generation):

        - The PAD is `pad_token_id` if given, else the tokenizer's pad token, else the backbone config's.
        - A PAD that is also an EOS id (Qwen3 lists its pad `<|endoftext|>` in `generation_config.eos_token_id`;
          the Qwen3.5 PIPO release uses `<|endoftext|>` as PAD) is **removed from every EOS list** of the
          converted model (backbone config and generation config), as the PIPO authors do for Qwen3.5, and one
          warning names the ids. The vocabulary, the tokenizer and the token's trained embedding stay as they are,
          and the model matches the `hub_configs` presets and converted releases.
        - Removing is refused when the PAD is the model's main stop token (the tokenizer's `eos_token`) or the
          only EOS id (GPT-2's `<|endoftext|>`, base models whose pad is their EOS): a PAD taken from the
          tokenizer/config is then replaced by a dedicated `pad_token` added to `tokenizer` (in place, embeddings
          resized only when the new id does not fit), and an explicit `pad_token_id` that is the only EOS id is
          an error.
        - Without any pad, `pad_token` is added to `tokenizer` (Llama 3, Mistral, GPT-2); pass e.g.
          `pad_token="<|finetune_right_pad_id|>"` to reuse a reserved token of the vocabulary instead.
        - The tokenizer's pad token is set to the PAD, so batching pads with it.

        Returns the model, or `(model, tokenizer)` with `return_tokenizer=True`.

        Args:
            backbone_kwargs: passed to `AutoModelForCausalLM.from_pretrained` when a path is given (dtype, ...).
            config_kwargs: extra [`PipoConfig`] fields (loss weights, `confidence_hidden_size`, ...).
        """
        from transformers import AutoModelForCausalLM

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
            pipo = cls(config)  # cheap skeleton; the real backbone is swapped in below
        body = getattr(causal_lm, causal_lm.base_model_prefix)
        pipo.model = body
        pipo.lm_head = causal_lm.get_output_embeddings()
        weight = pipo.lm_head.weight
        device, dtype = weight.device, weight.dtype
        hidden = config.hidden_size
        template = _norm_template(body)
        with torch.device(device):
            pipo.compressor = COMPRESSOR_CLASSES[compressor_type](hidden)
            pipo.mtp = PipoMTPHead(config.backbone_config, template)
            pipo.confidence_head = PipoConfidenceHead(hidden, config.confidence_hidden_size or hidden, template)
        for head in (pipo.compressor, pipo.mtp, pipo.confidence_head):
            for module in reversed(list(head.modules())):  # children first, as in post_init
                pipo._init_weights(module)
        pipo.mtp.to(dtype)
        _init_mtp_from_backbone(pipo, body, mtp_init, native)
        source_generation = source_generation if source_generation is not None else GenerationConfig()
        pipo.generation_config = copy.deepcopy(source_generation)
        pipo.generation_config._from_model_config = False
        pipo.generation_config.pad_token_id = pad_token_id
        pipo.generation_config.eos_token_id = layout.generation_eos
        if pipo.generation_config.do_sample is None:
            # An explicit value stops pipeline() from injecting its sampling defaults (DESIGN §5.4).
            pipo.generation_config.do_sample = False
        pipo.generation_config.pipo_confidence_threshold = confidence_threshold
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


def _init_mtp_from_backbone(pipo: PipoForCausalLM, body: nn.Module, scheme: str, native: dict | None) -> None:
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


def latent_positions(
    pair_mask: torch.Tensor | None, batch: int, n_lat: int, device: torch.device, cache: Cache | None = None
) -> torch.LongTensor:
    """RoPE positions of latents: `0..L-1` (offset by the cache), or `cumsum(mask) - 1` with batch padding."""
    if pair_mask is None:
        past = cache.get_seq_length() if cache is not None else 0
        return (torch.arange(n_lat, device=device) + past).unsqueeze(0).expand(batch, -1)
    positions = pair_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -n_lat:]



# ----------------------------------------------------------------------------------------------------------------------
# Lean decode step of a standard decoder body (eager decoding: per-step Python overhead)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeanBodyPlan:
    """How `lean_decode_step` steps a decoder body: its layer list's attribute name, how many layers run, and the
    mask kind (`"full_attention"` / `"sliding_attention"`) each layer reads."""

    layers_attr: str
    num_layers: int
    mask_kinds: tuple[str, ...]


_LEAN_PLAN_KEY = "_pipo_lean_plan"  # cached on the body's __dict__: a LeanBodyPlan, or False when ineligible
_LEAN_MASK_KINDS = ("full_attention", "sliding_attention")


def lean_body_plan(body: nn.Module) -> LeanBodyPlan | None:
    """The plan to step `body` directly, or None when its decode steps must take the full forward.

    Eligible: bodies whose forward is `masks -> rotary embedding -> layers(position_embeddings=...) -> norm` (Llama,
    Mistral, Qwen2/3, ...), with full or sliding-window attention layers. Recurrent/hybrid layers (Qwen3.5 linear
    attention), learned positions (GPT-2) and anything else take the full forward. Structure alone cannot see
    family-specific steps inside a forward (an embedding scale, say), so the plan is accepted only when a probe
    (two cached decode steps of a deterministic input, in eval mode) gives bitwise the same hidden states and cache
    as the body's own forward. Decided once per body and cached; a body in training mode is not planned (dropout).
    """
    cached = body.__dict__.get(_LEAN_PLAN_KEY)
    if cached is not None:
        return cached or None
    if body.training:
        return None
    plan = _structural_plan(body)
    if plan is not None and not _lean_matches_forward(body, plan):
        plan = None
    body.__dict__[_LEAN_PLAN_KEY] = plan if plan is not None else False
    return plan


def _structural_plan(body: nn.Module) -> LeanBodyPlan | None:
    import inspect

    config = getattr(body, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or not isinstance(getattr(body, "rotary_emb", None), nn.Module):
        return None
    if not isinstance(getattr(body, "norm", None), nn.Module):
        return None
    name = next((k for k, child in body.named_children() if isinstance(child, nn.ModuleList) and len(child) >= n),
                None)
    if name is None or n == 0:
        return None
    if "position_embeddings" not in inspect.signature(getattr(body, name)[0].forward).parameters:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        kinds = tuple(layer_types[:n])
    else:  # Mistral-style configs: one kind for every layer, chosen by `sliding_window`
        kinds = (("full_attention" if getattr(config, "sliding_window", None) is None else "sliding_attention"),) * n
    if len(kinds) != n or any(kind not in _LEAN_MASK_KINDS for kind in kinds):
        return None
    return LeanBodyPlan(name, n, kinds)


def lean_decode_step(
    body: nn.Module,
    plan: LeanBodyPlan,
    latents: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor,
    cache: Cache,
) -> torch.Tensor:
    """One cached decode step of `body` over `latents` `[B, q, H]`, calling its parts directly; returns the post-norm
    hidden states, as `body(inputs_embeds=latents, ..., use_cache=True).last_hidden_state` does."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    makers = {"full_attention": decode_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    masks = {
        kind: makers[kind](config=body.config, inputs_embeds=latents, attention_mask=attention_mask, cache=cache,
                           position_ids=position_ids)
        for kind in dict.fromkeys(plan.mask_kinds)
    }
    position_embeddings = body.rotary_emb(latents, position_ids)
    hidden = latents
    for layer, kind in zip(getattr(body, plan.layers_attr)[: plan.num_layers], plan.mask_kinds):
        hidden = layer(hidden, attention_mask=masks[kind], position_embeddings=position_embeddings,
                       position_ids=position_ids, cache=cache, use_cache=True)
    return body.norm(hidden)


# (attention implementation, is_causal) -> True once `create_causal_mask` returned None for one unpadded query on a
# dynamic cache: that mask is "attend to every cached key" at every step, which such an implementation (sdpa, flash)
# leaves to the kernel, so later steps need not rebuild it.
_NULL_DECODE_MASK: dict[tuple, bool] = {}


def decode_causal_mask(
    config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache,
    position_ids: torch.LongTensor,
) -> torch.Tensor | None:
    """`create_causal_mask` of a cached decode step (full attention), remembering per attention implementation when
    the unpadded one-query mask is None (see `_NULL_DECODE_MASK`). Padded batches, several queries and compileable
    (static) caches, and tracing, always build the mask."""
    from transformers.masking_utils import create_causal_mask

    plain = (attention_mask is None and inputs_embeds.shape[1] == 1 and not getattr(cache, "is_compileable", False)
             and not torch.compiler.is_compiling())
    key = (config._attn_implementation, getattr(config, "is_causal", True))
    if plain and _NULL_DECODE_MASK.get(key, False):
        return None
    mask = create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                              position_ids=position_ids)
    if plain and mask is None:
        _NULL_DECODE_MASK[key] = True
    return mask


def _lean_matches_forward(body: nn.Module, plan: LeanBodyPlan, prompt: int = 5, steps: int = 2) -> bool:
    """Whether `lean_decode_step` equals the body's forward bitwise (hidden states and cache) on a probe: a cached
    prompt, then `steps` one-position steps. The input is deterministic (no random generator is drawn)."""
    embedding = body.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if weight is None or weight.device.type == "meta":
        return False
    hidden = weight.shape[-1]
    total = prompt + steps
    with torch.no_grad():
        probe = torch.sin(torch.arange(total * hidden, device=weight.device, dtype=torch.float32) * 0.37)
        probe = probe.reshape(1, total, hidden).to(weight.dtype)
        positions = torch.arange(total, device=weight.device).unsqueeze(0)
        caches = [DynamicCache(config=body.config), DynamicCache(config=body.config)]
        for cache in caches:
            body(inputs_embeds=probe[:, :prompt], position_ids=positions[:, :prompt], cache=cache, use_cache=True)
        for t in range(prompt, total):
            ref = body(inputs_embeds=probe[:, t:t + 1], position_ids=positions[:, t:t + 1], cache=caches[0],
                       use_cache=True).last_hidden_state
            lean = lean_decode_step(body, plan, probe[:, t:t + 1], None, positions[:, t:t + 1], caches[1])
            if not torch.equal(ref, lean):
                return False
        for ref_layer, lean_layer in zip(caches[0].layers, caches[1].layers):
            for attr in ("keys", "values"):
                a, b = getattr(ref_layer, attr, None), getattr(lean_layer, attr, None)
                if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                    return False
    return True


__all__ = ["PipoForCausalLM", "PipoPreTrainedModel", "PipoCausalLMOutput", "pair_layout", "align_row"]
