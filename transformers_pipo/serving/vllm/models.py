"""vLLM modules of a PIPO checkpoint: the target model (compressor + backbone over latents) and the drafter (MTP layer
+ confidence head), built from vLLM's own decoder layers of the backbone family.

How PIPO maps onto vLLM (see docs/SERVING.md):

- vLLM schedules token positions. The plugin keeps every request's scheduled span pair-aligned (odd prompts get a
  PAD, chunks end on even positions, and speculative decoding with one draft token feeds exactly one pair per
  decode step), so the flat token batch folds into latents with a reshape.
- Backbone and MTP layers run projections and MLPs on latents (half the rows) at RoPE position ``latent index``;
  only the attention call runs on token rows: each latent's q/k/v is written into both token slots of its pair
  (duplicated KV, exact) and the output is read at the pair's second row.
- The drafter is vLLM's MTP/EAGLE path with ``num_speculative_tokens=1``: row ``2j+1`` of the drafter input holds
  ``(x[2j+2], h_j)``, exactly PIPO's MTP input at latent ``j``. Its output rows carry ``[m_j; h_j]`` so that the
  sampling hook can gate the draft with the confidence head.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .weights import group_pipo_weights

# vLLM backbone bodies that the latent layer forward below supports (standard pre-norm decoder layers with
# `self_attn.{qkv_proj, rotary_emb, attn, o_proj}`, `mlp`, `input_layernorm`, `post_attention_layernorm`).
SUPPORTED_BACKBONES = ("qwen3", "qwen2", "llama")
_STACKED = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


def check_supported(config) -> None:
    """Refuse, with the reason, PIPO checkpoints whose backbone this plugin cannot serve yet."""
    from . import check_vllm_version

    check_vllm_version()
    backbone = config.get_text_config()
    kind = getattr(backbone, "model_type", None)
    if kind in ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"):
        raise NotImplementedError(
            f"PIPO serving in vLLM does not support the {kind} hybrid backbone yet: its linear-attention (GDN) "
            "layers keep a recurrent state and a causal conv1d per token slot, so duplicating each latent into both "
            "slots of its pair (what this plugin does for full attention) would feed every latent twice; they need "
            "latent-level attention metadata (docs/SERVING.md, 'Not supported yet')."
        )
    if kind not in SUPPORTED_BACKBONES:
        raise NotImplementedError(
            f"PIPO serving in vLLM supports backbones {SUPPORTED_BACKBONES}; this checkpoint's backbone is {kind!r}."
        )
    if getattr(config, "num_mtp_layers", 1) != 1:
        raise NotImplementedError("PIPO serving supports exactly one MTP layer (pair size 2).")
    if getattr(config, "norm_style", None) not in (None, "w"):
        raise NotImplementedError(f"PIPO serving supports RMSNorm `x * w` backbones, not norm_style={config.norm_style!r}.")
    if getattr(backbone, "sliding_window", None) and getattr(backbone, "use_sliding_window", True):
        raise NotImplementedError("PIPO serving does not support sliding-window backbones yet.")
    config.require_pad_token()


def _body_class(model_type: str):
    if model_type == "qwen3":
        from vllm.model_executor.models.qwen3 import Qwen3Model

        return Qwen3Model
    if model_type == "qwen2":
        from vllm.model_executor.models.qwen2 import Qwen2Model

        return Qwen2Model
    from vllm.model_executor.models.llama import LlamaModel

    return LlamaModel


def _decoder_layer(model_type: str, config, vllm_config, prefix: str) -> nn.Module:
    if model_type == "qwen3":
        from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer as cls
    elif model_type == "qwen2":
        from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer as cls
    else:
        from vllm.model_executor.models.llama import LlamaDecoderLayer

        return LlamaDecoderLayer(vllm_config=vllm_config, config=config, prefix=prefix)
    return cls(config=config, cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
               prefix=prefix)


def _pair_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Rows ``1, 3, 5, ...`` (each pair's second row); an odd row count (dummy runs only) keeps its last row."""
    if tensor.shape[0] % 2:
        tensor = torch.cat([tensor, tensor[-1:]], dim=0)
    return tensor[1::2]


def _to_tokens(latents: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Repeat each latent row into both token rows of its pair (``num_tokens`` rows)."""
    return latents.repeat_interleave(2, dim=0)[:num_tokens]


def latent_self_attention(attn: nn.Module, positions: torch.Tensor, hidden: torch.Tensor, num_tokens: int):
    """vLLM attention block over latents: q/k/v and RoPE per latent, paged attention over duplicated token rows."""
    qkv, _ = attn.qkv_proj(hidden)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    if hasattr(attn, "q_norm"):
        head_dim = attn.head_dim
        q = attn.q_norm(q.view(*q.shape[:-1], q.shape[-1] // head_dim, head_dim)).view(q.shape)
        k = attn.k_norm(k.view(*k.shape[:-1], k.shape[-1] // head_dim, head_dim)).view(k.shape)
    q, k = attn.rotary_emb(positions, q, k)
    out = attn.attn(_to_tokens(q, num_tokens), _to_tokens(k, num_tokens), _to_tokens(v, num_tokens))
    out, _ = attn.o_proj(_pair_rows(out))
    return out


def latent_decoder_layer(layer: nn.Module, positions, hidden, residual, num_tokens: int):
    """A vLLM pre-norm decoder layer run on latents (same computation as its `forward`, latent attention)."""
    if residual is None:
        residual = hidden
        hidden = layer.input_layernorm(hidden)
    else:
        hidden, residual = layer.input_layernorm(hidden, residual)
    hidden = latent_self_attention(layer.self_attn, positions, hidden, num_tokens)
    hidden, residual = layer.post_attention_layernorm(hidden, residual)
    return layer.mlp(hidden), residual


def _latent_positions(positions: torch.Tensor) -> torch.Tensor:
    return _pair_rows(positions) // 2


def _check_pair_aligned(positions: torch.Tensor) -> None:
    """Every pair of rows must be token positions ``(2j, 2j+1)`` of one request; raise otherwise.

    Runs where positions live on the CPU (the CPU backend, and the tests); on an accelerator it would cost a
    host-device sync per step, and the scheduler hook already guarantees the layout. Skipped in dummy/profile runs
    (no attention metadata).
    """
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if positions.device.type != "cpu":
        return
    if not is_forward_context_available() or get_forward_context().attn_metadata is None:
        return
    n = positions.shape[0]
    if n % 2 or bool(((positions[0::2] % 2) != 0).any()) or bool((positions[1::2] != positions[0::2] + 1).any()):
        raise RuntimeError(
            f"PIPO got a batch that is not pair-aligned (positions {positions[:16].tolist()}...): every request's "
            "scheduled span must start at an even position and have even length. Serve PIPO checkpoints with the "
            "speculative config from transformers_pipo.serving.vllm.speculative_config() and the plugin loaded."
        )


def _load_layer(layer: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], prefix: str) -> set[str]:
    """Load HF-named weights of one decoder layer into vLLM's fused projections."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    params = dict(layer.named_parameters())
    loaded = set()
    for name, tensor in weights:
        for fused, shard, shard_id in _STACKED:
            if f".{shard}." in name:
                target = name.replace(f".{shard}.", f".{fused}.")
                param = params[target]
                param.weight_loader(param, tensor, shard_id)
                break
        else:
            target = name
            if target not in params:
                if "rotary_emb.inv_freq" in target:
                    continue
                raise KeyError(f"PIPO checkpoint key {prefix}{name} has no matching vLLM parameter.")
            param = params[target]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        loaded.add(prefix + target)
    return loaded


def _load_plain(module: nn.Module, weights: list, prefix: str) -> set[str]:
    """Load a plain torch module (compressor, norms, heads) from its keys; every parameter must be present."""
    state = {name: tensor for name, tensor in weights}
    missing = set(dict(module.named_parameters())) - set(state)
    if missing:
        raise KeyError(f"PIPO checkpoint lacks {sorted(prefix + m for m in missing)}.")
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(state[name].to(param.dtype))
    return {prefix + name for name, _ in module.named_parameters()}


class PipoForCausalLMVllm(nn.Module):
    """PIPO target model for vLLM: embed → compressor per pair → backbone layers over latents → final norm.

    Returns per-token hidden states in which both rows of a pair hold that latent's `h_j` (the drafter reads them);
    logits are taken by vLLM at each request's last row, i.e. `lm_head(h_last)` = token1. PAD is never sampled.
    """

    is_pipo_target = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.layers.logits_processor import LogitsProcessor
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        from transformers_pipo.modeling_pipo import COMPRESSOR_CLASSES

        config = vllm_config.model_config.hf_config
        check_supported(config)
        if vllm_config.use_v2_model_runner:
            raise NotImplementedError("PIPO serving runs on vLLM's V1 model runner (its drafter gate hooks the V1 "
                                      "proposer); unset VLLM_USE_V2_MODEL_RUNNER.")
        spec = vllm_config.speculative_config
        if spec is None or spec.num_speculative_tokens != 1 or spec.method != "mtp":
            raise ValueError("A PIPO checkpoint is served with its MTP drafter: speculative_config must be "
                             "transformers_pipo.serving.vllm.speculative_config() (set automatically when unset).")
        backbone = config.get_text_config()
        self.config = config
        self.backbone_type = backbone.model_type
        self.pad_token_id = int(config.pad_token_id)
        hidden = backbone.hidden_size
        body_config = vllm_config.with_hf_config(backbone, architectures=list(backbone.architectures or ["Body"]))
        self.model = _body_class(backbone.model_type)(vllm_config=body_config, prefix=_join(prefix, "model"))
        # The compressor stays fp32, as in transformers (`_keep_in_fp32_modules_strict`).
        self.compressor = COMPRESSOR_CLASSES[config.compressor_type](hidden).float()
        self.tied = bool(getattr(backbone, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings",
                                                                                     False))
        self.lm_head = ParallelLMHead(backbone.vocab_size, hidden, quant_config=vllm_config.quant_config,
                                      prefix=_join(prefix, "lm_head"))
        if self.tied:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(backbone.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if intermediate_tensors is not None:
            raise NotImplementedError("PIPO serving does not support pipeline parallelism.")
        embeds = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        num_tokens = embeds.shape[0]
        _check_pair_aligned(positions)
        if num_tokens % 2:  # dummy runs only (real batches are checked above)
            embeds = torch.cat([embeds, embeds[-1:]], dim=0)
        pairs = embeds.reshape(embeds.shape[0] // 2, 2 * embeds.shape[1])
        latents = self.compressor(pairs.float()).to(embeds.dtype)
        lpos = _latent_positions(positions)
        hidden, residual = latents, None
        for layer in self.model.layers[self.model.start_layer:self.model.end_layer]:
            hidden, residual = latent_decoder_layer(layer, lpos, hidden, residual, num_tokens)
        hidden, _ = self.model.norm(hidden, residual)
        return _to_tokens(hidden, num_tokens)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.logits_processor(self.lm_head, hidden_states)
        if logits is not None:
            logits[:, self.pad_token_id] = -float("inf")
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        groups = group_pipo_weights(weights)
        loaded = {"model." + name for name in self.model.load_weights(groups["backbone"])}
        loaded |= _load_plain(self.compressor, groups["compressor"], "compressor.")
        if not self.tied:
            from vllm.model_executor.model_loader.weight_utils import default_weight_loader

            head = dict(groups["lm_head"])
            if "weight" not in head:
                raise KeyError("PIPO checkpoint has no lm_head.weight but its backbone does not tie embeddings.")
            param = self.lm_head.weight
            getattr(param, "weight_loader", default_weight_loader)(param, head["weight"])
            loaded.add("lm_head.weight")
        return loaded


class _Namespace(nn.Module):
    """A bare container (for checkpoint-shaped parameter names)."""


class PipoMTPDrafterVllm(nn.Module):
    """PIPO drafter for vLLM's MTP path: `fc([norm_e(E(token1)); norm_h(h)])` → one decoder layer of the backbone's
    class (own paged KV, latent positions) → `mtp.norm`; output rows are `[m_j; h_j]`.

    The embedding and LM head are the target's (vLLM's proposer shares them into `model.embed_tokens` and
    `lm_head` after loading). `compute_logits` reads the `m` half; `confidence` gives `sigmoid(Conf(h, m))`.
    """

    is_pipo_drafter = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        from transformers_pipo.modeling_pipo import _mtp_body_config

        config = vllm_config.model_config.hf_config
        check_supported(config)
        backbone = config.get_text_config()
        hidden = backbone.hidden_size
        eps = backbone.rms_norm_eps
        self.hidden_size = hidden
        self.pad_token_id = int(config.pad_token_id)
        body = _mtp_body_config(backbone)
        body_vllm_config = vllm_config.with_hf_config(body, architectures=list(backbone.architectures or ["Body"]))
        self.model = _Namespace()  # receives the target's `embed_tokens`
        self.mtp = _Namespace()
        self.mtp.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.mtp.pre_fc_norm_embedding = RMSNorm(hidden, eps=eps)
        self.mtp.pre_fc_norm_hidden = RMSNorm(hidden, eps=eps)
        self.mtp.layers = nn.ModuleList([_decoder_layer(backbone.model_type, body, body_vllm_config,
                                                        _join(prefix, "mtp.layers.0"))])
        self.mtp.norm = RMSNorm(hidden, eps=eps)
        inner = config.confidence_hidden_size or hidden
        self.confidence_head = _Namespace()
        self.confidence_head.norm = RMSNorm(2 * hidden, eps=eps)
        self.confidence_head.fc1 = nn.Linear(2 * hidden, inner, bias=False)
        self.confidence_head.fc2 = nn.Linear(inner, 1, bias=False)
        self.confidence_head.float()  # fp32, as in transformers
        self.logits_processor = LogitsProcessor(backbone.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        num_tokens = hidden_states.shape[0] if input_ids is None else input_ids.shape[0]
        embeds = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        # Row 2j+1 holds (x[2j+2], h_j): the MTP input of latent j. Row 2j is the pair's first slot (unused).
        e, h = _pair_rows(embeds[:num_tokens]), _pair_rows(hidden_states[:num_tokens])
        u = self.mtp.fc(torch.cat([self.mtp.pre_fc_norm_embedding(e), self.mtp.pre_fc_norm_hidden(h)], dim=-1))
        out, residual = latent_decoder_layer(self.mtp.layers[0], _latent_positions(positions[:num_tokens]), u, None,
                                             num_tokens)
        m, _ = self.mtp.norm(out, residual)
        return _to_tokens(torch.cat([m, h], dim=-1), num_tokens)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.logits_processor(self.lm_head, hidden_states[..., : self.hidden_size])
        if logits is not None:
            logits[:, self.pad_token_id] = -float("inf")
        return logits

    def confidence(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`sigmoid(Conf(h, m))` per row of drafter output rows `[m; h]`."""
        m, h = hidden_states[..., : self.hidden_size], hidden_states[..., self.hidden_size:]
        x = self.confidence_head.norm(torch.cat([h, m], dim=-1).float())
        logit = self.confidence_head.fc2(torch.nn.functional.silu(self.confidence_head.fc1(x)))
        return torch.sigmoid(logit.squeeze(-1).float())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        groups = group_pipo_weights(weights)
        mtp = groups["mtp"]
        layer = [(name[len("layers.0."):], t) for name, t in mtp if name.startswith("layers.0.")]
        other = [(name, t) for name, t in mtp if not name.startswith("layers.")]
        extra = sorted(name for name, _ in mtp if name.startswith("layers.") and not name.startswith("layers.0."))
        if extra:
            raise KeyError(f"PIPO serving supports one MTP layer; the checkpoint has {extra[:3]}...")
        loaded = _load_layer(self.mtp.layers[0], layer, "mtp.layers.0.")
        heads = nn.ModuleDict({"fc": self.mtp.fc, "pre_fc_norm_embedding": self.mtp.pre_fc_norm_embedding,
                               "pre_fc_norm_hidden": self.mtp.pre_fc_norm_hidden, "norm": self.mtp.norm})
        loaded |= _load_plain(heads, other, "mtp.")
        loaded |= _load_plain(self.confidence_head, groups["confidence_head"], "confidence_head.")
        return loaded


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
