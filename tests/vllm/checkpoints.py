"""Tiny fp32 PIPO checkpoints for the vLLM tests (built with this project, saved with `save_pretrained`)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

VOCAB = 512
PAD_ID = VOCAB - 1
EOS_ID = 2


def backbone_config(family: str):
    """A tiny random backbone vLLM's CPU attention accepts (head_dim 32) with varied tokens (init range 0.3)."""
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.3, eos_token_id=EOS_ID, bos_token_id=1,
                  max_position_embeddings=512)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    raise KeyError(family)


def build_pipo(family: str = "qwen3", seed: int = 0, confidence_scale: float = 4.0, tau: float = 0.5,
               layout: str = "flat"):
    """A PIPO model from a tiny random backbone; the confidence head's last layer is scaled so that sigmoid(conf)
    spreads over (0, 1) and a mid τ both commits and rejects drafts."""
    from transformers_pipo import PipoForCausalLM

    torch.manual_seed(seed)
    backbone = AutoModelForCausalLM.from_config(backbone_config(family)).float()
    model = PipoForCausalLM.from_backbone(backbone, pad_token_id=PAD_ID, compressor_type="mlp").float().eval()
    with torch.no_grad():
        for p in list(model.compressor.parameters()) + list(model.mtp.fc.parameters()):
            p.add_(0.05 * torch.randn_like(p))
        model.confidence_head.fc2.weight.mul_(confidence_scale)
    model.generation_config.pipo_confidence_threshold = tau
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model


def save(model, folder, layout: str = "flat") -> str:
    """`save_pretrained` (which writes the nested layout: `model.backbone.*`, `model.<head>.*`, `lm_head.*`), then
    optionally rewrite the keys to the flat layout checkpoints saved before the PipoModel split use (`model.*` for the
    backbone, PIPO heads at the top level)."""
    model.save_pretrained(folder)
    if layout == "flat":
        from safetensors.torch import load_file, save_file

        from transformers_pipo.serving.vllm.weights import PIPO_HEADS

        path = f"{folder}/model.safetensors"
        state = load_file(path)
        renamed = {}
        for key, tensor in state.items():
            if key.startswith("model.backbone."):
                renamed["model." + key[len("model.backbone."):]] = tensor
            elif key.startswith("model.") and key.split(".")[1] in PIPO_HEADS:
                renamed[key[len("model."):]] = tensor
            else:
                renamed[key] = tensor
        assert len(renamed) == len(state)
        save_file(renamed, path, metadata={"format": "pt"})
    return str(folder)
