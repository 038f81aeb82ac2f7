"""Quantized loading: `from_pretrained(..., quantization_config=...)` quantizes the backbone and the MTP layer while the
compressor and the confidence head stay in float32 (`_keep_in_fp32_modules`), and PIPO generation still works.

CPU paths: bitsandbytes' CPU backend (int8 and nf4) and torchao int8 weight-only; each is skipped with a reason when
its package is missing. The CUDA kernels are exercised by the `gpu`-marked tests (skipped without CUDA).
Hidden size 64 and 32 linear-attention value heads keep every quantized matrix compatible with bitsandbytes' CPU
4-bit packing (blocks of 64 inputs, 32 outputs), as in the real models.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.qwen3_5 import Qwen3_5TextConfig

from conftest import BOS_ID, EOS_ID, PAD_ID, tiny_backbone_config
from transformers_pipo import PipoForCausalLM

HEADS_KEPT = ("model.compressor", "model.confidence_head")
QUANTIZED_PREFIXES = ("model.backbone.layers.", "model.mtp.layers.0.", "model.mtp.fc")
PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8, 77]])


def backbone_config(family: str):
    if family == "qwen3_5":
        return Qwen3_5TextConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, linear_num_key_heads=4, linear_num_value_heads=32,
            linear_key_head_dim=8, linear_value_head_dim=4, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
        )
    return tiny_backbone_config(family, hidden=64)


@pytest.fixture(scope="module", params=["qwen3", "qwen3_5"])
def saved(request, tmp_path_factory):
    """(folder, fp32 model, fp32 outputs on PROMPT) of a tiny PIPO model saved to disk."""
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(backbone_config(request.param))
    model = PipoForCausalLM.from_backbone(backbone, pad_token_id=PAD_ID).eval()
    folder = tmp_path_factory.mktemp(f"pipo-{request.param}")
    model.save_pretrained(folder)
    with torch.no_grad():
        out = model(PROMPT)
    return folder, model, out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten().float().cpu(), b.flatten().float().cpu(), dim=0))


def linear_layers(model) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def check_heads_kept(model) -> None:
    for name, module in linear_layers(model).items():
        if name.startswith(HEADS_KEPT) or name == "lm_head":
            assert type(module) is nn.Linear, f"{name} was quantized: {type(module).__name__}"
    for name, param in model.named_parameters():
        if name.startswith(HEADS_KEPT):
            assert param.dtype == torch.float32 and type(param.data) is torch.Tensor, name


def check_generate(model) -> None:
    out = model.generate(PROMPT, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    seq = out.sequences
    assert torch.equal(seq[:, : PROMPT.shape[1]], PROMPT)
    new = seq[0, PROMPT.shape[1]:]
    assert 1 <= new.numel() <= 6 and bool(((new >= 0) & (new < 128)).all())
    assert int(out.decode_steps[0]) >= 1  # PIPO decoding ran (its statistics are reported)


def check_outputs_close(out, ref, min_cosine: float) -> None:
    """token1/token2 logits point the same way as fp32's; the draft confidence c moves by little."""
    for field in ("logits", "mtp_logits"):
        value = cosine(getattr(out, field), getattr(ref, field))
        assert value > min_cosine, f"{field}: cosine {value:.4f} vs fp32"
    shift = (torch.sigmoid(out.confidence_logits.float().cpu()) - torch.sigmoid(ref.confidence_logits)).abs().max()
    assert float(shift) < 0.05, f"confidence moved by {float(shift):.4f} vs fp32"


def bnb_config(bnb, mode: str, compute_dtype: torch.dtype):
    """The bitsandbytes quantization config for `mode` ("int8" or "nf4") and the Linear class it produces."""
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True), bnb.nn.Linear8bitLt
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return config, bnb.nn.Linear4bit


# ----------------------------------------------------------------------------------------------------------------------
# bitsandbytes, CPU backend
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_bitsandbytes_cpu(saved, mode):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install '.[quant]')")

    folder, _, ref = saved
    qconfig, qclass = bnb_config(bnb, mode, compute_dtype=torch.float32)
    min_cos = 0.999 if mode == "int8" else 0.97
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qconfig).eval()
    assert isinstance(model, PipoForCausalLM)

    linears = linear_layers(model)
    quantized = [n for n, m in linears.items() if isinstance(m, qclass)]
    assert any(n.startswith("model.backbone.layers.") for n in quantized)  # backbone
    assert any(n.startswith("model.mtp.layers.0.") for n in quantized) and "model.mtp.fc" in quantized  # MTP layer
    for name, module in linears.items():
        if name.startswith(QUANTIZED_PREFIXES):
            assert isinstance(module, qclass), f"{name} not quantized"
    check_heads_kept(model)
    assert model.get_memory_footprint() < saved[1].get_memory_footprint()

    with torch.no_grad():
        out = model(PROMPT)
    check_outputs_close(out, ref, min_cos)
    check_generate(model)


def test_bitsandbytes_nf4_save_and_reload(saved, tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install '.[quant]')")

    folder = saved[0]
    qconfig, _ = bnb_config(bnb, "nf4", compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qconfig).eval()
    # Saved before any CPU forward: bitsandbytes 0.50 repacks 4-bit weights for its CPU kernel on the first forward
    # and unpacks them on save, a round trip that is not bit-exact.
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        before = model(PROMPT)
    assert "bitsandbytes" in (tmp_path / "README.md").read_text()  # the card names the quantization
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    check_heads_kept(again)
    with torch.no_grad():
        after = again(PROMPT)
    for field in ("logits", "mtp_logits", "confidence_logits"):
        torch.testing.assert_close(getattr(after, field), getattr(before, field))


# ----------------------------------------------------------------------------------------------------------------------
# torchao int8 (the CPU-friendly path without bitsandbytes)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["weight_only", "dynamic_activation"])
def test_torchao_int8_cpu(saved, scheme):
    quantization = pytest.importorskip("torchao.quantization",
                                       reason="torchao is not installed (pip install '.[quant]')")
    from transformers import TorchAoConfig

    folder, _, ref = saved
    quant_type = (quantization.Int8WeightOnlyConfig() if scheme == "weight_only"
                  else quantization.Int8DynamicActivationInt8WeightConfig())
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=TorchAoConfig(quant_type=quant_type))
    model.eval()
    for name, module in linear_layers(model).items():
        if name.startswith(QUANTIZED_PREFIXES):
            assert type(module.weight.data) is not torch.Tensor, f"{name} not quantized"
    check_heads_kept(model)
    with torch.no_grad():
        out = model(PROMPT)
    check_outputs_close(out, ref, 0.999)
    check_generate(model)


# ----------------------------------------------------------------------------------------------------------------------
# CUDA kernels
# ----------------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_bitsandbytes_cuda(saved, mode):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install '.[quant]')")

    folder, _, ref = saved
    qconfig, qclass = bnb_config(bnb, mode, compute_dtype=torch.float16)
    min_cos = 0.99 if mode == "int8" else 0.95
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qconfig, device_map={"": 0}).eval()
    assert isinstance(model.get_submodule("model.mtp.fc"), qclass)
    check_heads_kept(model)
    assert model.compressor.mlp[0].weight.device.type == "cuda"
    with torch.no_grad():
        out = model(PROMPT.cuda())
    check_outputs_close(out, ref, min_cos)
    seq = model.generate(PROMPT.cuda(), max_new_tokens=6, do_sample=False)
    assert torch.equal(seq[:, : PROMPT.shape[1]].cpu(), PROMPT)
