"""Real checkpoints' PAD/EOS layouts end to end, with offline stand-ins (`tests/real_layouts.py`).

For Qwen3 (pad inside the EOS list), the Qwen3.5 PIPO release (the authors' PAD is the config's EOS), Llama-3.2
(no pad, three EOS ids), Mistral (no pad) and GPT-2 (bos = eos, no pad): `from_backbone(path, tokenizer=tok)` →
generate (stops on every remaining EOS, never emits PAD) → pipeline (strings, batches, chat) → save → a fresh
process without the package reloads and generates the same tokens. Also runs the README Quickstart and the
hub_configs README recipes as written, with the stand-ins instead of the Hub.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from real_layouts import LAYOUTS, build_backbone, build_tokenizer, write_standin
from transformers import AutoTokenizer, pipeline

from transformers_pipo import PipoForCausalLM

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = list(LAYOUTS)
PROMPT = "The capital of France is"
SHORT = "hello world"
NEW = 6


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("standins")
    return {name: write_standin(layout, root / name) for name, layout in LAYOUTS.items()}


@pytest.fixture(scope="module")
def converted(standins):
    """`(model, tokenizer)` per family, converted from the stand-in folder the way a user does from a Hub id."""
    out = {}
    for name, src in standins.items():
        tok = AutoTokenizer.from_pretrained(src)
        model = PipoForCausalLM.from_backbone(str(src), tokenizer=tok, pipo_confidence_threshold=0.5).eval()
        out[name] = (model, tok)
    return out


def _eos_list(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _greedy(model, tok, prompt=PROMPT, **kwargs):
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, **kwargs)
    return enc.input_ids[0].tolist(), out


# ------------------------------------------------------------------------------------------------------------------
# from_backbone: the PAD/EOS rule
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_pad_and_eos_of_each_layout(converted, family):
    layout = LAYOUTS[family]
    model, tok = converted[family]
    pad = model.config.pad_token_id
    assert pad == layout.expect_pad == model.generation_config.pad_token_id == tok.pad_token_id
    assert _eos_list(model.generation_config.eos_token_id) == layout.expect_generation_eos
    assert model.config.eos_token_ids == layout.expect_generation_eos  # the backbone config agrees
    assert pad not in model.config.eos_token_ids and pad not in _eos_list(model.generation_config.eos_token_id)
    assert model.config.vocab_size == layout.expect_vocab == model.get_input_embeddings().weight.shape[0]
    assert model.lm_head.weight.shape[0] == layout.expect_vocab
    # the published sampling defaults travel with the model
    for key in ("temperature", "top_p", "top_k", "bos_token_id"):
        if key in layout.generation:
            assert getattr(model.generation_config, key) == layout.generation[key], key
    if layout.expect_pad >= layout.vocab_size:  # a dedicated PAD was added
        assert tok.convert_ids_to_tokens(pad) == "<|pipo_pad|>"
    else:  # the published pad token is kept, with its trained embedding
        assert tok.convert_ids_to_tokens(pad) == layout.roles["pad_token"]


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5"])
def test_pad_in_eos_list_is_removed_with_one_warning(standins, family, caplog):
    layout = LAYOUTS[family]
    tok = AutoTokenizer.from_pretrained(standins[family])
    with caplog.at_level(logging.WARNING):
        PipoForCausalLM.from_backbone(str(standins[family]), tokenizer=tok)
    warnings = [r.getMessage() for r in caplog.records if "PIPO PAD" in r.getMessage()]
    assert len(warnings) == 1, warnings
    message = warnings[0]
    assert f"PIPO PAD {layout.expect_pad} '<|endoftext|>'" in message
    assert str(layout.generation["eos_token_id"]) in message  # the list it was removed from
    assert f"eos_token_id={layout.expect_generation_eos}" in message  # what is left


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_no_warning_when_nothing_is_removed(standins, family, caplog):
    tok = AutoTokenizer.from_pretrained(standins[family])
    with caplog.at_level(logging.WARNING):
        PipoForCausalLM.from_backbone(build_backbone(LAYOUTS[family]), tokenizer=tok)
    assert not [r for r in caplog.records if "PIPO PAD" in r.getMessage()]


def test_pad_that_is_the_main_or_only_eos_gets_a_dedicated_token():
    # Qwen3-Base style: the tokenizer's eos and pad are both <|endoftext|>, the only EOS id
    layout = LAYOUTS["qwen3"]
    backbone = build_backbone(layout)
    backbone.config.eos_token_id = 151643
    backbone.generation_config.eos_token_id = 151643
    tok = build_tokenizer(layout)
    tok.eos_token = "<|endoftext|>"
    model = PipoForCausalLM.from_backbone(backbone, tokenizer=tok)
    assert model.config.pad_token_id == 151669 == tok.pad_token_id  # first free id; fits the 151936 rows
    assert model.config.vocab_size == 151936  # no resize needed
    assert model.generation_config.eos_token_id == 151643 and model.config.eos_token_ids == [151643]
    # an explicit PAD that would leave no EOS is refused, naming the ids
    with pytest.raises(ValueError, match=r"pad_token_id=50256 equals an EOS id and is the backbone's only one"):
        PipoForCausalLM.from_backbone(build_backbone(LAYOUTS["gpt2"]), pad_token_id=50256)


def test_explicit_reserved_pad_token_is_reused():
    # Llama 3: reuse the reserved <|finetune_right_pad_id|> (the hub preset's PAD) instead of growing the vocabulary
    layout = LAYOUTS["llama"]
    tok = build_tokenizer(layout)
    model = PipoForCausalLM.from_backbone(build_backbone(layout), tokenizer=tok, pad_token="<|finetune_right_pad_id|>")
    assert model.config.pad_token_id == 128004 == tok.pad_token_id and model.config.vocab_size == 128256
    tok = build_tokenizer(layout)
    model = PipoForCausalLM.from_backbone(build_backbone(layout), tokenizer=tok, pad_token_id=128004)
    assert tok.pad_token == "<|finetune_right_pad_id|>" and model.config.vocab_size == 128256


# ------------------------------------------------------------------------------------------------------------------
# generate and pipeline
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_never_emits_pad_and_stops_on_every_eos(converted, family):
    layout = LAYOUTS[family]
    model, tok = converted[family]
    pad = model.config.pad_token_id
    # a fresh confidence head says c ≈ 0.5: τ = 0.6 rejects every draft (PAD inputs), τ = 0.4 commits every one
    for tau, commits in ((0.6, False), (0.4, True)):
        prompt, out = _greedy(model, tok, pipo_confidence_threshold=tau)
        new = out.sequences[0, len(prompt):].tolist()
        assert out.sequences[0, : len(prompt)].tolist() == prompt and len(new) == NEW and pad not in new
        assert out.committed_drafts.tolist() == (out.decode_steps.tolist() if commits else [0]), tau
    for eos in layout.expect_generation_eos:
        _, stopped = _greedy(model, tok, sequence_bias={(eos,): 100.0})
        assert stopped.sequences[0].tolist() == prompt + [eos], eos
    # the PAD, even pushed by a processor, is never emitted and (removed from EOS) never stops generation
    _, pushed = _greedy(model, tok, sequence_bias={(pad,): 100.0}, pipo_confidence_threshold=-1.0)
    assert len(pushed.sequences[0]) == len(prompt) + NEW and pad not in pushed.sequences[0].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_strings_batches_and_chat(converted, family):
    model, tok = converted[family]
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "return_full_text": False}
    single = [pipe(p, **kwargs)[0]["generated_text"] for p in (PROMPT, SHORT)]
    batch = [r[0]["generated_text"] for r in pipe([PROMPT, SHORT], batch_size=2, **kwargs)]
    assert batch == single and all(single)
    prompt, out = _greedy(model, tok)
    assert single[0] == tok.decode(out.sequences[0, len(prompt):], skip_special_tokens=True)
    if LAYOUTS[family].chat_template:
        chat = pipe([{"role": "user", "content": SHORT}], max_new_tokens=NEW, do_sample=False)
        reply = chat[0]["generated_text"][-1]
        assert reply["role"] == "assistant" and isinstance(reply["content"], str)


# ------------------------------------------------------------------------------------------------------------------
# save → fresh process without the package → generate
# ------------------------------------------------------------------------------------------------------------------

FRESH = textwrap.dedent(
    """
    import json, sys
    sys.modules["transformers_pipo"] = None  # only the shipped remote code may be used
    import torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    results = {}
    for family, folder in json.loads(sys.argv[1]).items():
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        enc = tok(sys.argv[2], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=int(sys.argv[3]), do_sample=False)
        pipe = pipeline("text-generation", model=folder, trust_remote_code=True)
        text = pipe(sys.argv[2], max_new_tokens=int(sys.argv[3]), do_sample=False, return_full_text=False)
        gen = model.generation_config
        results[family] = {
            "sequence": out[0].tolist(), "pipeline": text[0]["generated_text"], "module": type(model).__module__,
            "pad": gen.pad_token_id, "eos": gen.eos_token_id, "tau": gen.pipo_confidence_threshold,
            "tok_pad": tok.pad_token_id, "config_eos": model.config.backbone_config.eos_token_id,
        }
    print("\\nRESULTS" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def fresh_results(converted, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    folders, expected = {}, {}
    for family, (model, tok) in converted.items():
        folder = root / family
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders[family] = str(folder)
        prompt, out = _greedy(model, tok)
        expected[family] = out.sequences[0].tolist()
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps(folders), PROMPT, str(NEW)],
        capture_output=True, text=True, timeout=600, cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULTS"))
    return json.loads(line[len("RESULTS"):]), expected


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_model_reloads_in_a_fresh_process_and_generates_the_same(converted, fresh_results, family):
    results, expected = fresh_results
    got = results[family]
    model, tok = converted[family]
    layout = LAYOUTS[family]
    assert got["module"].startswith("transformers_modules.")  # the remote code, not the package
    assert got["sequence"] == expected[family]
    assert got["pipeline"] == tok.decode(expected[family][len(tok(PROMPT).input_ids):], skip_special_tokens=True)
    assert got["pad"] == got["tok_pad"] == layout.expect_pad
    assert _eos_list(got["eos"]) == layout.expect_generation_eos == _eos_list(got["config_eos"])
    assert got["tau"] == 0.5


# ------------------------------------------------------------------------------------------------------------------
# the documented recipes, as written
# ------------------------------------------------------------------------------------------------------------------


def _python_blocks(markdown: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown.read_text(), flags=re.S)


def test_readme_quickstart_runs_as_written(standins, tmp_path, monkeypatch, capsys):
    section = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert '"Qwen/Qwen3-0.6B"' in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"Qwen/Qwen3-0.6B"', repr(str(standins["qwen3"]))), "README-quickstart", "exec"), {})
    printed = capsys.readouterr().out
    assert "commit rate" in printed and "backbone steps" in printed
    assert (tmp_path / "qwen3-pipo" / "modeling_pipo.py").is_file()


HUB_IDS = {"Qwen/Qwen3-0.6B": "qwen3", "meta-llama/Llama-3.2-1B-Instruct": "llama",
           "Qwen/Qwen3.5-4B": "qwen3_5"}


def test_hub_configs_readme_recipes_run_as_written(standins, monkeypatch):
    blocks = _python_blocks(ROOT / "hub_configs" / "README.md")
    assert blocks
    monkeypatch.chdir(ROOT)
    used = set()
    for i, code in enumerate(blocks):
        for hub_id, family in HUB_IDS.items():
            if f'"{hub_id}"' in code:
                used.add(family)
                code = code.replace(f'"{hub_id}"', repr(str(standins[family])))
        assert "Qwen/" not in code and "meta-llama/" not in code, f"block {i} names a Hub id without a stand-in"
        namespace: dict = {}
        exec(compile(code, f"hub_configs-README-{i}", "exec"), namespace)
        for value in namespace.values():  # every PIPO model a recipe makes agrees with its preset and generates
            if isinstance(value, PipoForCausalLM) and value.device.type != "meta":
                tok = namespace.get("tok")
                ids = tok(PROMPT, return_tensors="pt").input_ids if tok is not None else torch.tensor([[3, 4, 5]])
                out = value.generate(ids, max_new_tokens=4, do_sample=False)
                assert value.config.pad_token_id not in out[0, ids.shape[1]:].tolist()
    assert {"qwen3", "llama"} <= used


# ------------------------------------------------------------------------------------------------------------------
# pipo train sft --from_backbone: same PAD rules, chosen by flag
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "flags", "pad", "eos", "vocab"),
    [
        ("qwen3", ["--pad_token_id", "151643"], 151643, [151645], 151936),
        ("llama", ["--pad_token", "<|finetune_right_pad_id|>"], 128004, [128001, 128008, 128009], 128256),
    ],
)
def test_train_sft_from_backbone_pad_flags(standins, tmp_path, family, flags, pad, eos, vocab):
    from transformers import GenerationConfig

    from transformers_pipo.cli import main

    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "hello world The", "response": "capital of France is Paris"})
                              for _ in range(2)) + "\n")
    out = tmp_path / "out"
    assert main(["train", "sft", "--model", str(standins[family]), "--from_backbone", "true", *flags,
                 "--train_file", str(data), "--output_dir", str(out), "--max_steps", "1",
                 "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == pad and config["backbone_config"]["vocab_size"] == vocab
    assert _eos_list(GenerationConfig.from_pretrained(out).eos_token_id) == eos
    assert AutoTokenizer.from_pretrained(out).pad_token_id == pad
