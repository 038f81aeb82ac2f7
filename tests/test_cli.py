"""The `pipo` command line: help, stack versions and a checkpoint summary."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import PAD_ID, tiny_backbone_config, tiny_pipo

from transformers_pipo import __version__
from transformers_pipo.cli import main


def test_console_script_points_at_main():
    # The installed `pipo` script calls transformers_pipo.cli:main (exercised in-process below; a subprocess would
    # spend seconds importing transformers for nothing more).
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="pipo")
    assert script.value == "transformers_pipo.cli:main"
    assert script.load() is main
    assert shutil.which("pipo") is not None


def test_help_in_process(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "PIPO" in out and "info" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: pipo" in capsys.readouterr().out


def test_info_prints_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "transformers_pipo" in out and __version__ in out and "torch" in out


def test_info_json(capsys):
    import transformers

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["transformers_pipo"] == __version__
    assert info["transformers"] == transformers.__version__
    assert "model" not in info


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_model")
    tiny_pipo("qwen3", compressor_type="linear").save_pretrained(folder)
    return folder


def test_info_on_saved_checkpoint(saved_dir, capsys):
    assert main(["info", str(saved_dir), "--json"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["backbone_model_type"] == "qwen3"
    assert model["compressor_type"] == "linear"
    assert model["pad_token_id"] == PAD_ID
    assert model["hidden_size"] == 32 and model["num_hidden_layers"] == 2 and model["vocab_size"] == 128
    assert model["eos_token_ids"] == [2]
    assert model["norm_style"] == "w"

    assert main(["info", str(saved_dir)]) == 0
    text = capsys.readouterr().out
    assert "compressor_type" in text and "qwen3" in text


def test_info_rejects_non_pipo_checkpoint(tmp_path):
    tiny_backbone_config("llama").save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match=r"'llama' checkpoint, not a PIPO one"):
        main(["info", str(tmp_path)])
