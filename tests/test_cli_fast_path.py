"""`--fast-path` of `pipo demo` / `pipo generate`: the generation-config switches it sets and the paths it runs."""

from __future__ import annotations

import json

import pytest
from conftest import make_tokenizer, tiny_pipo

from transformers_pipo.cli import main
from transformers_pipo.commands._fast_path import apply_fast_path


def test_apply_fast_path_sets_transformers_switches():
    model = tiny_pipo("llama")
    assert apply_fast_path([model], "auto") == "eager"  # CPU: a cold compile does not pay off for a CLI call
    assert model.generation_config.cache_implementation is None
    assert apply_fast_path([model], "static") == "static"
    assert model.generation_config.cache_implementation == "static" and model.generation_config.disable_compile
    assert apply_fast_path([model], "compiled") == "compiled"
    config = model.generation_config
    assert config.cache_implementation == "static" and not config.disable_compile
    assert config.compile_config._compile_all_devices
    assert apply_fast_path([model], "eager") == "eager" and config.cache_implementation is None


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fast_path_model")
    tiny_pipo("qwen3").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_pipo_generate_static_path_matches_eager(saved_dir, capsys):
    outputs = []
    for path in ("eager", "static"):
        args = ["generate", "--model", str(saved_dir), "--prompt", "w5 w9 w11", "--max-new-tokens", "12",
                "--pipo-confidence-threshold", "0.5", "--fast-path", path]
        assert main(args) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0].split()) > 3


def test_pipo_demo_reports_the_path(capsys):
    assert main(["demo", "--n", "1", "--seed", "0", "--fast-path", "static"]) == 0
    out = capsys.readouterr().out
    assert "static decoding path" in out and "speedup" in out
    assert main(["demo", "--n", "1", "--seed", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for mode in ("pipo", "regular"):  # the summary's accuracy is the share of problems answered right
        correct = [p[mode]["correct"] for p in report["problems"]]
        assert len(correct) == 1 and report["summary"][f"{mode}_accuracy"] == sum(correct) / len(correct)
