"""save_pretrained ships the remote code: a process without transformers_pipo reloads it bit-exactly, builds a
text-generation pipeline, and with the package imported the same folder loads without trust_remote_code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_tokenizer, tiny_backbone_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from transformers_pipo import PipoForCausalLM

FAMILIES = ["qwen3", "gpt2", "llama"]  # tied (Qwen3, GPT-2) and untied (Llama)
TIED = {"qwen3": True, "gpt2": True, "llama": False}
OUTPUT_FIELDS = ("logits", "mtp_logits", "confidence_logits", "loss", "backbone_loss", "mtp_loss", "confidence_loss")


def _inputs():
    ids = torch.tensor([[5, 9, 14, 3, 22, 40, 41, 7, 8, 60, 61, 62, 9]])
    labels = ids.clone()
    labels[:, :5] = -100
    return ids, labels


def _outputs(model) -> dict[str, torch.Tensor]:
    ids, labels = _inputs()
    with torch.no_grad():
        out = model(ids, labels=labels)
    return {name: getattr(out, name) for name in OUTPUT_FIELDS}


def _build(family: str):
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(tiny_backbone_config(family, vocab_size=len(tokenizer)))
    model, tokenizer = PipoForCausalLM.from_backbone(
        source, tokenizer, compressor_type="mlp", return_tokenizer=True, pipo_confidence_threshold=0.8
    )
    # Move every PIPO head away from its init, so a reload that re-initialised them would be caught.
    with torch.no_grad():
        for head in (model.compressor, model.mtp, model.confidence_head):
            for p in head.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model.eval(), tokenizer


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["transformers_pipo"] = None  # the package must not be importable: only the shipped files are used
    import torch
    from transformers import AutoModelForCausalLM, pipeline

    fields = {fields!r}
    ids = torch.tensor({ids!r})
    labels = torch.tensor({labels!r})
    results = {{}}
    for family, folder in json.loads(sys.argv[1]).items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(ids, labels=labels)
        reference = torch.load(folder + ".ref.pt")
        state = torch.load(folder + ".state.pt")
        loaded_state = model.state_dict()
        pipe = pipeline("text-generation", model=folder, trust_remote_code=True)
        results[family] = {{
            "class": type(model).__name__,
            "module": type(model).__module__,
            "equal": {{f: bool(torch.equal(getattr(out, f), reference[f])) for f in fields}},
            "state_keys_equal": sorted(state) == sorted(loaded_state),
            "state_mismatch": [k for k in state if k in loaded_state and not torch.equal(state[k], loaded_state[k])],
            "tied": model.lm_head.weight is model.get_input_embeddings().weight,
            "pipeline_model": type(pipe.model).__name__,
            "pipeline_pad": pipe.tokenizer.pad_token_id,
        }}
    print("RESULT " + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per family: the saved folder, the source model's state dict and outputs, and the outputs of the folder
    reloaded through the installed package (the reference for the package-free reload)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fast; the subprocess uses one thread too
    root = tmp_path_factory.mktemp("pipo_remote")
    folders, sources, reloaded = {}, {}, {}
    for family in FAMILIES:
        model, tokenizer = _build(family)
        folder = root / family
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        sources[family] = (model.state_dict(), _outputs(model))
        torch.save(model.state_dict(), f"{folder}.state.pt")
        # Reference for the subprocess: the same file loaded by the same loader gets the same (mmap) memory
        # alignment, so BLAS takes the same code path and results must be bit-identical.
        package_model = AutoModelForCausalLM.from_pretrained(folder).eval()
        reloaded[family] = (package_model, _outputs(package_model))
        torch.save(reloaded[family][1], f"{folder}.ref.pt")
        folders[family] = str(folder)
    yield folders, sources, reloaded
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def remote_results(saved, tmp_path_factory):
    folders = saved[0]
    ids, labels = _inputs()
    script = REMOTE_SCRIPT.format(fields=OUTPUT_FIELDS, ids=ids.tolist(), labels=labels.tolist())
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("hf_modules")),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(folders)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_folder_contents(saved, family):
    folders = saved[0]
    folder = folders[family]
    files = set(os.listdir(folder))
    for name in ("model.safetensors", "config.json", "generation_config.json", "configuration_pipo.py",
                 "modeling_pipo.py", "generation_pipo.py"):
        assert name in files, name
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["auto_map"] == {
        "AutoConfig": "configuration_pipo.PipoConfig",
        "AutoModelForCausalLM": "modeling_pipo.PipoForCausalLM",
    }
    assert config["architectures"] == ["PipoForCausalLM"]
    assert config["model_type"] == "pipo" and config["backbone_config"]["model_type"] == family
    assert config["pad_token_id"] == 127
    generation = json.load(open(os.path.join(folder, "generation_config.json")))
    assert generation["pad_token_id"] == 127 and generation["pipo_confidence_threshold"] == 0.8


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_key_layout(saved, family):
    folders = saved[0]
    with safe_open(os.path.join(folders[family], "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    for key in ("model.compressor.mlp.0.weight", "model.compressor.mlp.0.bias", "model.compressor.mlp.2.weight",
                "model.compressor.mlp.2.bias", "model.mtp.fc.weight", "model.mtp.pre_fc_norm_embedding.weight",
                "model.mtp.pre_fc_norm_hidden.weight", "model.confidence_head.norm.weight",
                "model.confidence_head.fc1.weight", "model.confidence_head.fc2.weight"):
        assert key in keys, key
    assert any(k.startswith(("model.mtp.layers.0.", "model.mtp.h.0.")) for k in keys)
    assert not any(k.startswith("model.mtp._body") for k in keys)
    assert ("lm_head.weight" in keys) is (not TIED[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_reload_without_package_is_bit_identical(remote_results, family):
    result = remote_results[family]
    assert result["class"] == "PipoForCausalLM"
    assert result["module"].startswith("transformers_modules."), result["module"]
    assert result["state_keys_equal"] and result["state_mismatch"] == [], result["state_mismatch"]
    assert all(result["equal"].values()), result["equal"]
    assert result["tied"] is TIED[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_builds_from_remote_code(remote_results, family):
    result = remote_results[family]
    assert result["pipeline_model"] == "PipoForCausalLM"
    assert result["pipeline_pad"] == 127


@pytest.mark.parametrize("family", FAMILIES)
def test_package_loads_folder_without_trust_remote_code(saved, family):
    folders, sources, reloaded = saved
    model, outputs = reloaded[family]
    assert type(model) is PipoForCausalLM  # the pip class, not a dynamic module
    state, source_outputs = sources[family]
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    for name in OUTPUT_FIELDS:
        # Bit-identical weights; outputs may differ in the last ulp only because the reloaded tensors live in an
        # mmap at a different memory alignment (BLAS picks another kernel), hence allclose here and torch.equal
        # between the two reloads of the same file.
        torch.testing.assert_close(outputs[name], source_outputs[name], rtol=0, atol=1e-6)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) is TIED[family]
    assert model.config.pad_token_id == 127 and model.config.compressor_type == "mlp"
    assert model.generation_config.pad_token_id == 127
    # A second reload through the package is bit-identical to the first.
    again = _outputs(AutoModelForCausalLM.from_pretrained(folders[family]).eval())
    for name in OUTPUT_FIELDS:
        assert torch.equal(again[name], outputs[name]), name


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_bf16_round_trip_keeps_fp32_heads_bit_identical(tmp_path, dtype):
    # from_backbone on a bf16 backbone keeps the compressor and confidence head in fp32; reloading (default dtype
    # or an explicit bf16) must not round them to bf16.
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3"), dtype=torch.bfloat16)
    model = PipoForCausalLM.from_backbone(source, pad_token_id=127).eval()
    with torch.no_grad():
        for head in (model.compressor, model.confidence_head):
            for p in head.parameters():
                p.add_(1e-3 * torch.randn_like(p))  # values that bf16 cannot represent
    assert {p.dtype for p in model.compressor.parameters()} == {torch.float32}
    assert {p.dtype for p in model.confidence_head.parameters()} == {torch.float32}
    assert model.mtp.fc.weight.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    kwargs = {} if dtype is None else {"dtype": dtype}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs).eval()
    state, loaded = model.state_dict(), reloaded.state_dict()
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key
