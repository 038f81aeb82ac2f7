"""`pipo convert-reference`: a synthetic checkpoint in exactly the authors' layout converts losslessly.

The reference checkpoint is built by hand from raw random tensors (DESIGN §6.1 key names and shapes, Qwen3.5 gated
`q_proj` of `2·heads·head_dim` rows, a reference-style config.json). After conversion our model's token1, token2
and confidence outputs are compared with a computation done here directly from those raw tensors: the backbone
through a stock `Qwen3_5ForCausalLM` loaded with the raw backbone tensors, the compressor, the MTP layer (gated
attention, partial RoPE, zero-centred norms) and the confidence head written out by hand.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Qwen3_5ForCausalLM
from transformers.models.qwen3_5 import Qwen3_5TextConfig

from transformers_pipo import PipoForCausalLM
from transformers_pipo.cli import main as cli_main
from transformers_pipo.conversion import ReferenceLayoutError, convert_reference

V, H, NH, NKV, HD, INTER = 128, 32, 4, 2, 16, 64
PAD, EOS, BOS = 127, 2, 1
EPS = 1e-6


def text_config(tied: bool) -> Qwen3_5TextConfig:
    return Qwen3_5TextConfig(
        vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=4, num_attention_heads=NH,
        num_key_value_heads=NKV, head_dim=HD, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8, tie_word_embeddings=tied, rms_norm_eps=EPS,
        bos_token_id=BOS, eos_token_id=EOS,
    )


def mtp_shapes() -> dict[str, tuple[int, ...]]:
    """The 15 `mtp.*` tensors of a dense Qwen3.5 MTP module (DESIGN §6.1)."""
    layer = "mtp.layers.0."
    return {
        "mtp.fc.weight": (H, 2 * H),
        "mtp.pre_fc_norm_embedding.weight": (H,),
        "mtp.pre_fc_norm_hidden.weight": (H,),
        "mtp.norm.weight": (H,),
        layer + "input_layernorm.weight": (H,),
        layer + "post_attention_layernorm.weight": (H,),
        layer + "self_attn.q_proj.weight": (2 * NH * HD, H),  # query + output gate
        layer + "self_attn.k_proj.weight": (NKV * HD, H),
        layer + "self_attn.v_proj.weight": (NKV * HD, H),
        layer + "self_attn.o_proj.weight": (H, NH * HD),
        layer + "self_attn.q_norm.weight": (HD,),
        layer + "self_attn.k_norm.weight": (HD,),
        layer + "mlp.gate_proj.weight": (INTER, H),
        layer + "mlp.up_proj.weight": (INTER, H),
        layer + "mlp.down_proj.weight": (H, INTER),
    }


def head_shapes(compressor: str) -> dict[str, tuple[int, ...]]:
    shapes = {
        "confidence_head.norm.weight": (2 * H,),
        "confidence_head.fc1.weight": (H, 2 * H),
        "confidence_head.fc2.weight": (1, H),
    }
    if compressor == "mlp":
        shapes.update({"compressor.mlp.0.weight": (2 * H, 2 * H), "compressor.mlp.0.bias": (2 * H,),
                       "compressor.mlp.2.weight": (H, 2 * H), "compressor.mlp.2.bias": (H,)})
    else:
        shapes.update({"compressor.linear.weight": (H, 2 * H), "compressor.linear.bias": (H,)})
    return shapes


def reference_tensors(tied: bool, compressor: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the reference key names (backbone shapes read off a stock Qwen3.5 model)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {}
    with torch.device("meta"):
        stock = Qwen3_5ForCausalLM(text_config(tied))
    for key, tensor in stock.state_dict().items():
        if key.startswith("model."):
            shapes["model.language_model." + key[len("model."):]] = tuple(tensor.shape)
    if not tied:
        shapes["lm_head.weight"] = (V, H)
    shapes.update(mtp_shapes())
    shapes.update(head_shapes(compressor))
    tensors = {}
    for key, shape in shapes.items():
        scale = 0.5 if len(shape) == 1 else 1.0 / math.sqrt(shape[-1])
        tensors[key] = (torch.randn(shape, generator=gen) * scale).contiguous()
    return tensors


def write_reference(folder, tensors, *, tied: bool, compressor: str | None, style: str = "flat",
                    sharded: bool = False, eos=EOS, generation_eos=None, extra: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    text = text_config(tied).to_dict()
    text.pop("transformers_version", None)
    text["eos_token_id"] = eos
    pipo = {"architectures": ["Qwen3_5ForCausalPIPO"], "pad_token_id": PAD, "mtp_num_hidden_layers": 1}
    if compressor is not None:
        pipo["compressor_type"] = compressor
    if style == "flat":
        config = {**text, **pipo}
    else:
        config = {**pipo, "model_type": "qwen3_5", "text_config": text, "tie_word_embeddings": tied,
                  "vision_config": {"model_type": "qwen3_5_vision", "depth": 1}}
    config.update(extra or {})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if generation_eos is not None:
        (folder / "generation_config.json").write_text(
            json.dumps({"bos_token_id": BOS, "eos_token_id": generation_eos, "pad_token_id": PAD})
        )
    if sharded:
        keys = sorted(tensors)
        half = len(keys) // 2
        shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
        weight_map = {}
        for name, part in shards.items():
            save_file({k: tensors[k] for k in part}, folder / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))


# ----------------------------------------------------------------------------------------------------------------------
# the independent computation, from raw reference tensors only
# ----------------------------------------------------------------------------------------------------------------------


def rms(x, weight):
    """Zero-centred RMSNorm of Qwen3.5: x / rms(x) * (1 + w)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * (1.0 + weight)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def partial_rope(x, positions, theta):
    """RoPE on the first quarter of the head dim (partial_rotary_factor 0.25); all mRoPE sections share the index."""
    dim = int(HD * 0.25)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = positions[:, None].float() * inv_freq
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    rot, rest = x[..., :dim], x[..., dim:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)  # x: [heads, n, HD]


def reference_outputs(raw: dict[str, torch.Tensor], ids: torch.LongTensor, tied: bool, compressor: str):
    """token1 logits [L, V], token2 logits [L-1, V], confidence logits [L-1] for one row of ids."""
    config = text_config(tied)
    backbone = {"model." + k[len("model.language_model."):]: v for k, v in raw.items()
                if k.startswith("model.language_model.")}
    backbone["lm_head.weight"] = raw["model.language_model.embed_tokens.weight"] if tied else raw["lm_head.weight"]
    stock = Qwen3_5ForCausalLM(config).eval()
    stock.load_state_dict(backbone, strict=True)
    embed = raw["model.language_model.embed_tokens.weight"]
    lm_head = backbone["lm_head.weight"]

    pairs = torch.cat([embed[ids[0::2]], embed[ids[1::2]]], dim=-1)  # [L, 2H]
    if compressor == "mlp":
        z = F.silu(pairs @ raw["compressor.mlp.0.weight"].T + raw["compressor.mlp.0.bias"])
        z = z @ raw["compressor.mlp.2.weight"].T + raw["compressor.mlp.2.bias"]
    else:
        z = pairs @ raw["compressor.linear.weight"].T + raw["compressor.linear.bias"]
    n_lat = z.shape[0]
    with torch.no_grad():
        h = stock.model(inputs_embeds=z[None], position_ids=torch.arange(n_lat)[None]).last_hidden_state[0]
    token1 = h @ lm_head.T

    # MTP: u_j = fc([norm_e(E(x[2j+2])); norm_h(h_j)]), one gated full-attention layer over positions 0..L-2
    p = "mtp.layers.0."
    hh, t1 = h[:-1], ids[2::2]
    n = hh.shape[0]
    u = torch.cat([rms(embed[t1], raw["mtp.pre_fc_norm_embedding.weight"]),
                   rms(hh, raw["mtp.pre_fc_norm_hidden.weight"])], dim=-1) @ raw["mtp.fc.weight"].T
    a = rms(u, raw[p + "input_layernorm.weight"])
    q_gate = (a @ raw[p + "self_attn.q_proj.weight"].T).view(n, NH, 2 * HD)
    q, gate = q_gate[..., :HD], q_gate[..., HD:].reshape(n, NH * HD)
    q = rms(q, raw[p + "self_attn.q_norm.weight"]).transpose(0, 1)  # [NH, n, HD]
    k = rms((a @ raw[p + "self_attn.k_proj.weight"].T).view(n, NKV, HD), raw[p + "self_attn.k_norm.weight"])
    v = (a @ raw[p + "self_attn.v_proj.weight"].T).view(n, NKV, HD)
    k, v = k.transpose(0, 1), v.transpose(0, 1)
    positions = torch.arange(n)
    theta = config.rope_parameters["rope_theta"]
    q, k = partial_rope(q, positions, theta), partial_rope(k, positions, theta)
    k, v = k.repeat_interleave(NH // NKV, dim=0), v.repeat_interleave(NH // NKV, dim=0)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(HD)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, NH * HD) * torch.sigmoid(gate)
    x = u + attn @ raw[p + "self_attn.o_proj.weight"].T
    b = rms(x, raw[p + "post_attention_layernorm.weight"])
    x = x + (F.silu(b @ raw[p + "mlp.gate_proj.weight"].T) * (b @ raw[p + "mlp.up_proj.weight"].T)) @ raw[
        p + "mlp.down_proj.weight"].T
    m = rms(x, raw["mtp.norm.weight"])
    token2 = m @ lm_head.T

    c = rms(torch.cat([hh, m], dim=-1), raw["confidence_head.norm.weight"]) @ raw["confidence_head.fc1.weight"].T
    confidence = (F.silu(c) @ raw["confidence_head.fc2.weight"].T).squeeze(-1)
    return token1, token2, confidence


# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tied,compressor,style,sharded",
    [(True, "mlp", "flat", False), (False, "linear", "nested", True)],
    ids=["tied-mlp-flat", "untied-linear-nested-sharded"],
)
def test_convert_matches_raw_tensor_computation(tmp_path, tied, compressor, style, sharded):
    raw = reference_tensors(tied, compressor)
    if style == "nested":  # the VL release also carries the vision tower, which is ignored
        raw["model.visual.patch_embed.proj.weight"] = torch.randn(8, 3, 2, 2)
    src, dst = tmp_path / "ref", tmp_path / "pipo"
    write_reference(src, raw, tied=tied, compressor=compressor, style=style, sharded=sharded)

    report = convert_reference(src, dst)

    # every tensor accounted for: mapped or (vision) ignored, nothing left over
    assert set(report.mapped) | set(report.ignored) == set(raw)
    assert report.ignored == (["model.visual.patch_embed.proj.weight"] if style == "nested" else [])
    assert report.compressor_type == compressor and report.tie_word_embeddings == tied
    assert report.config_style == style and report.pad_token_id == PAD
    assert (dst / "tokenizer_config.json").is_file() and (dst / "README.md").is_file()

    model, info = PipoForCausalLM.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()
    config = model.config
    assert config.compressor_type == compressor and config.pad_token_id == PAD
    assert config.backbone_config.model_type == "qwen3_5_text" and config.tie_word_embeddings == tied
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    state = model.state_dict()
    for src_key, our_key in report.mapped.items():  # every parameter holds its raw source tensor
        assert torch.equal(state[our_key], raw[src_key]), src_key

    ids = torch.tensor([5, 17, 99, 3, 42, 8, 77, 61, 12, 90, 33, 7])
    with torch.no_grad():
        out = model(ids[None])
    token1, token2, confidence = reference_outputs(raw, ids, tied, compressor)
    torch.testing.assert_close(out.logits[0], token1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.mtp_logits[0], token2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.confidence_logits[0], confidence, rtol=1e-4, atol=1e-4)


def test_bare_model_prefix_pad_removed_from_eos_and_cli(tmp_path, capsys):
    raw = reference_tensors(True, "mlp", seed=1)
    bare = {("model." + k[len("model.language_model."):] if k.startswith("model.language_model.") else k): v
            for k, v in raw.items()}
    src = tmp_path / "ref"
    # the published configs list <|endoftext|> (= the PIPO PAD) among the EOS ids
    write_reference(src, bare, tied=True, compressor=None, eos=PAD, generation_eos=[EOS, PAD])
    assert cli_main(["convert-reference", str(src), str(tmp_path / "out"), "--pipo-confidence-threshold", "0.8"]) == 0
    assert "compressor: mlp" in capsys.readouterr().out  # found from the keys (config has no compressor_type)
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [EOS] and gen["pad_token_id"] == PAD and gen["pipo_confidence_threshold"] == 0.8
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pipo.PipoForCausalLM"
    assert config["backbone_config"]["eos_token_id"] == EOS

    # nothing but the PAD as EOS: refuse, naming the flag
    src2 = tmp_path / "ref2"
    write_reference(src2, bare, tied=True, compressor="mlp", eos=PAD)
    with pytest.raises(ValueError, match="no EOS id is left and the tokenizer names no other eos_token; pass --eos"):
        convert_reference(src2, tmp_path / "out2", verify=False)


def _source_with_transformers_generation_config(folder, extra=None):
    """A reference folder whose generation_config.json was written by transformers from a model config
    (`_from_model_config: true`, as released checkpoints have), with sampling defaults of its own."""
    write_reference(folder, reference_tensors(True, "mlp", seed=5), tied=True, compressor="mlp", eos=PAD,
                    generation_eos=[EOS, PAD], extra=extra)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update({"_from_model_config": True, "transformers_version": "4.57.1", "do_sample": True, "temperature": 1.0,
                "top_k": 20, "top_p": 0.95})
    (folder / "generation_config.json").write_text(json.dumps(gen))


def test_every_field_from_the_command_line_survives_a_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "ref"
    _source_with_transformers_generation_config(src)
    out = tmp_path / "out"
    assert cli_main(["convert-reference", str(src), str(out), "--pipo-confidence-threshold", "0.5", "--compressor-type",
                     "mlp", "--pad-token-id", str(PAD), "--eos-token-id", str(EOS), "7"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    gen = model.generation_config
    assert gen.pipo_confidence_threshold == 0.5  # was dropped on load (back to 0.95) with _from_model_config
    assert gen._from_model_config is False
    assert model.config.compressor_type == "mlp"
    assert model.config.pad_token_id == gen.pad_token_id == PAD
    assert gen.eos_token_id == [EOS, 7] and model.config.eos_token_ids == [EOS, 7]
    assert (gen.do_sample, gen.temperature, gen.top_k, gen.top_p) == (True, 1.0, 20, 0.95)  # the source's sampling
    ids = torch.tensor([[5, 9, 14, 3]])
    out_tau = model.generate(ids, max_new_tokens=4, do_sample=False, pipo_confidence_threshold=0.3)  # per-call τ
    assert out_tau.shape[1] <= 8


@pytest.mark.parametrize(
    ("field", "value", "check"),
    [
        ("mtp_loss_weight", 0.3, lambda m: m.config.mtp_loss_weight),
        ("confidence_loss_weight", 0.7, lambda m: m.config.confidence_loss_weight),
        ("conf_threshold", 0.8, lambda m: m.generation_config.pipo_confidence_threshold),
        ("pipo_conf_threshold", 0.6, lambda m: m.generation_config.pipo_confidence_threshold),
        ("compressor_type", "mlp", lambda m: m.config.compressor_type),
        ("pad_token_id", PAD, lambda m: m.generation_config.pad_token_id),
    ],
)
def test_every_pipo_field_of_the_source_survives_a_reload(tmp_path, field, value, check):
    src = tmp_path / "ref"
    _source_with_transformers_generation_config(src, extra={field: value})
    convert_reference(src, tmp_path / "out", verify=False)
    model = PipoForCausalLM.from_pretrained(tmp_path / "out")
    assert check(model) == value


def test_converting_a_converted_folder_says_so(tmp_path, capsys):
    src = tmp_path / "ref"
    write_reference(src, reference_tensors(True, "mlp", seed=6), tied=True, compressor="mlp")
    convert_reference(src, tmp_path / "once", verify=False)
    with pytest.raises(ValueError, match=r"already a PIPO checkpoint \(config.json has model_type 'pipo'\)"):
        convert_reference(tmp_path / "once", tmp_path / "twice")
    assert cli_main(["convert-reference", str(tmp_path / "once"), str(tmp_path / "twice")]) == 2
    assert "already a PIPO checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()


def test_qwen35_release_with_pad_only_eos_takes_eos_from_the_tokenizer(tmp_path):
    """The Qwen3.5 release: config EOS = PAD = 248044 only, no generation_config.json, tokenizer eos <|im_end|>."""
    from real_layouts import LAYOUTS, build_tokenizer
    from transformers import AutoTokenizer, GenerationConfig

    vocab = 248320
    raw = reference_tensors(True, "mlp", seed=7)
    raw["model.language_model.embed_tokens.weight"] = torch.randn(vocab, H) * 0.1
    src = tmp_path / "qwen35"
    write_reference(src, raw, tied=True, compressor="mlp", eos=248044, extra={"vocab_size": vocab,
                                                                             "pad_token_id": 248044})
    assert not (src / "generation_config.json").exists()
    build_tokenizer(LAYOUTS["qwen3_5"]).save_pretrained(src)
    report = convert_reference(src, tmp_path / "out")  # no flags
    assert report.pad_token_id == 248044 and report.eos_token_ids == [248046]
    assert any("<|im_end|>" in note for note in report.notes)
    gen = GenerationConfig.from_pretrained(tmp_path / "out")
    assert gen.eos_token_id == [248046] and gen.pad_token_id == 248044
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["backbone_config"]["eos_token_id"] == 248046 and config["pad_token_id"] == 248044
    tok = AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert tok.pad_token_id == 248044 and tok.eos_token_id == 248046


def test_wrong_layout_lists_unexpected_and_missing_keys(tmp_path, capsys):
    raw = reference_tensors(True, "mlp", seed=2)
    raw["mtp.fc_proj.weight"] = raw.pop("mtp.fc.weight")  # renamed key
    del raw["model.language_model.layers.1.mlp.up_proj.weight"]  # dropped key
    raw["extra_head.weight"] = torch.zeros(2, 2)  # foreign key
    src = tmp_path / "bad"
    write_reference(src, raw, tied=True, compressor="mlp")
    with pytest.raises(ReferenceLayoutError) as err:
        convert_reference(src, tmp_path / "out")
    assert err.value.unexpected == ["extra_head.weight", "mtp.fc_proj.weight"]
    assert err.value.missing == ["model.layers.1.mlp.up_proj.weight", "mtp.fc.weight"]
    message = str(err.value)
    assert "2 unexpected keys" in message and "2 missing keys" in message and "mtp.fc_proj.weight" in message

    assert cli_main(["convert-reference", str(src), str(tmp_path / "out3")]) == 2
    stderr = capsys.readouterr().err
    assert "unexpected keys" in stderr and "missing keys" in stderr and "extra_head.weight" in stderr


def test_compressor_type_conflict_and_untied_without_head(tmp_path):
    raw = reference_tensors(True, "mlp", seed=3)
    src = tmp_path / "conflict"
    write_reference(src, raw, tied=True, compressor="linear")
    with pytest.raises(ReferenceLayoutError, match=r"compressor_type 'linear' \(from config.json\) disagrees"):
        convert_reference(src, tmp_path / "o1")
    src = tmp_path / "nohead"
    write_reference(src, raw, tied=False, compressor="mlp")  # untied config but no lm_head.weight
    with pytest.raises(ReferenceLayoutError, match="lm_head.weight is absent") as err:
        convert_reference(src, tmp_path / "o2")
    assert err.value.missing == ["lm_head.weight"]


def test_help_documents_the_layout(capsys):
    with pytest.raises(SystemExit):
        cli_main(["convert-reference", "--help"])
    text = capsys.readouterr().out
    for needle in ("model.language_model.*", "mtp.layers.0.*", "compressor.mlp.{0,2}", "confidence_head.fc2",
                   "Qwen3_5ForCausalPIPO", "text_config", "adapter_config.json", "--base"):
        assert needle in text, needle


# ----------------------------------------------------------------------------------------------------------------------
# unmerged LoRA adapters (DESIGN §6.2)
# ----------------------------------------------------------------------------------------------------------------------


def test_lora_adapter_is_merged_like_peft(tmp_path):
    peft = pytest.importorskip("peft")
    raw = reference_tensors(True, "mlp", seed=4)
    base_dir = tmp_path / "base"
    # the SFT base: a backbone with native mtp.* weights but no compressor / confidence head yet
    base = {k: v for k, v in raw.items() if not k.startswith(("compressor.", "confidence_head."))}
    write_reference(base_dir, base, tied=True, compressor=None)
    base_dir_full = tmp_path / "base_full"
    write_reference(base_dir_full, raw, tied=True, compressor="mlp")
    convert_reference(base_dir_full, tmp_path / "pipo_base")
    model = PipoForCausalLM.from_pretrained(tmp_path / "pipo_base")

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                           modules_to_save=["compressor", "confidence_head"])
    pm = peft.get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    adapter_dir = tmp_path / "checkpoint-1500"
    pm.save_pretrained(adapter_dir)
    # Our adapter names modules in our layout (`model.backbone.*`, `model.<head>.*`); the released adapters use the
    # reference layout (`model.*`, `<head>.*`), which is what convert-reference reads.
    from transformers_pipo.conversion.reference import reference_key

    adapter_file = adapter_dir / "adapter_model.safetensors"
    prefix = "base_model.model."
    renamed = {prefix + reference_key(k[len(prefix):]): v for k, v in load_file(adapter_file).items()}
    save_file(renamed, adapter_file, metadata={"format": "pt"})
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen3.5-4B"  # as in the released adapters: not a local folder
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    (adapter_dir / "additional_config.json").write_text(json.dumps({"compressor_type": "mlp"}))

    with pytest.raises(ValueError, match="unmerged LoRA adapter .* Pass --base PATH"):
        convert_reference(adapter_dir, tmp_path / "refused")

    report = convert_reference(adapter_dir, tmp_path / "merged", base=base_dir)
    assert report.merged_lora["modules"] > 0 and report.compressor_type == "mlp"

    expected = pm.merge_and_unload().eval()
    ours = PipoForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[5, 17, 99, 3, 42, 8, 77, 61]])
    with torch.no_grad():
        a, b = ours(ids), expected(ids)
    for field in ("logits", "mtp_logits", "confidence_logits"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-4, atol=1e-4)
