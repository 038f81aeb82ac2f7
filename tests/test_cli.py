"""The `pipo` command line: help, stack versions and a checkpoint summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

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
    from importlib.metadata import version

    for dist in ("torch", "peft", "trl", "accelerate", "bitsandbytes"):
        assert info[dist] == version(dist), dist


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
    assert model["confidence_threshold"] == 0.95  # τ from generation_config.json

    assert main(["info", str(saved_dir)]) == 0
    text = capsys.readouterr().out
    assert "compressor_type" in text and "qwen3" in text


def test_info_rejects_non_pipo_checkpoint(tmp_path, capsys):
    tiny_backbone_config("llama").save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"pipo info: error: {tmp_path} is a 'llama' checkpoint, not a PIPO one.\n"


# ---------------------------------------------------------------------------------------------------------------------
# The real `pipo` entry point in a subprocess: exit codes, one stderr line, no traceback, no noise
# ---------------------------------------------------------------------------------------------------------------------

NOISE = ("Traceback", "Failed to load", "_pytree", "kernels", "Warning", "warn(", "Retrying")


def pipo(*args, cwd, env=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
    start = time.perf_counter()
    proc = subprocess.run(["pipo", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    proc.seconds = time.perf_counter() - start
    return proc


@pytest.fixture(scope="module")
def user_folders(tmp_path_factory, saved_dir):
    """A PIPO folder with a tokenizer and only 8 positions (16 tokens), a configless folder, a corrupt copy."""
    from conftest import make_tokenizer

    root = tmp_path_factory.mktemp("user")
    short = tiny_pipo("qwen3", compressor_type="linear")
    short.config.backbone_config.max_position_embeddings = 8
    short.save_pretrained(root / "short")
    tok = make_tokenizer()
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(root / "short")
    (root / "empty").mkdir()
    shutil.copytree(root / "short", root / "corrupt")
    data = (root / "corrupt" / "model.safetensors").read_bytes()
    (root / "corrupt" / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download
    return root


def assert_user_error(proc, *needles):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert not any(n in proc.stderr for n in NOISE), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_user_errors_end_in_one_line_and_exit_2(user_folders):
    root = user_folders
    line = assert_user_error(pipo("info", "--jsn", cwd=root), "unknown option --jsn (did you mean --json?)")
    assert line.startswith("pipo info: error:")
    assert_user_error(pipo("generate", "--prompt", "x", "--max-new-tokens", "0", cwd=root),
                      "pipo generate: error: argument --max-new-tokens: must be at least 1, got 0")
    assert_user_error(pipo("genrate", cwd=root), "did you mean 'generate'?")
    # A mistyped path is found locally (no Hub round trip, no retries), with the closest folder suggested.
    assert_user_error(pipo("generate", "--model", "./shrt", "--prompt", "x", cwd=root),
                      "--model ./shrt: no such folder (did you mean ./short?)")
    assert_user_error(pipo("info", "org/missing-model", cwd=root, env={"HF_HUB_OFFLINE": "1"}),
                      "org/missing-model: no such folder and the Hub is offline")
    assert_user_error(pipo("generate", "--model", "empty", "--prompt", "x", cwd=root),
                      "--model empty: the folder has no config.json")


def in_process_error(capsys, *args) -> str:
    """`main(args)` in this process: exit code 2 and the last stderr line (after any progress bars)."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def test_train_user_errors(user_folders, capsys, monkeypatch):
    monkeypatch.chdir(user_folders)
    line = in_process_error(capsys, "train", "sft", "--model", "short", "--dataset_name", "d.jsonl", "--max_stpes", 2)
    assert line == "pipo train sft: error: unknown option --max_stpes (did you mean --max_steps?)"
    line = in_process_error(capsys, "train", "sft", "--model", "short", "--dataset_name", "d.jsonl")
    assert line == "pipo train sft: error: --dataset_name d.jsonl: no such file or folder"
    line = in_process_error(capsys, "train", "accelerate-config", "cpu", "--num_procs", 2)
    assert line == "pipo train accelerate-config: error: unknown option --num_procs (did you mean --num_processes?)"


def test_loading_errors_name_the_problem(user_folders, capsys, monkeypatch):
    monkeypatch.chdir(user_folders)
    line = in_process_error(capsys, "generate", "--model", "corrupt", "--prompt", "x")
    assert line.startswith("pipo generate: error: corrupt/model.safetensors is not a readable safetensors file")
    prompt = " ".join(["w5"] * 17)
    line = in_process_error(capsys, "generate", "--model", "short", "--prompt", prompt, "--max-new-tokens", 2)
    assert line == ("pipo generate: error: the prompt has 17 tokens but the model holds at most 16 (a PIPO model holds "
                    "2 × max_position_embeddings tokens (one position per pair)); shorten the prompt")
    assert main(["generate", "--model", "short", "--prompt", " ".join(["w5"] * 16), "--max-new-tokens", "1"]) == 0
    # --debug: the traceback is there for whoever wants it.
    with pytest.raises(Exception, match="(?i)header|deserializ|safetensor"):
        main(["--debug", "generate", "--model", "corrupt", "--prompt", "x"])


def test_quiet_by_default(user_folders):
    proc = pipo("--help", cwd=user_folders)
    assert proc.returncode == 0 and proc.stderr == "" and "generate" in proc.stdout
    print(f"pipo --help: {proc.seconds:.2f} s")  # reported, not asserted
    proc = pipo("generate", "--model", "short", "--prompt", "w5 w6", "--max-new-tokens", "4", cwd=user_folders)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "backbone steps, commit rate" in lines[0], proc.stderr  # only the stats line


def test_import_is_light_and_still_registers(saved_dir, tmp_path):
    code = f"""
import sys
import transformers_pipo
heavy = sorted(m for m in ("torch", "transformers", "torchao", "bitsandbytes", "peft", "trl") if m in sys.modules)
assert not heavy, heavy
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
config = AutoConfig.from_pretrained({str(saved_dir)!r})  # no trust_remote_code: registered on import
assert type(config).__module__ == "transformers_pipo.configuration_pipo", type(config)
assert type(AutoModelForCausalLM.from_pretrained({str(saved_dir)!r})).__name__ == "PipoForCausalLM"
print("OK")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-3000:]


def test_tokenizer_never_asks_the_trust_remote_code_question(user_folders, tmp_path):
    # Without the package: once the model is loaded with trust_remote_code=True, AutoTokenizer on the same folder
    # must not stop at the `[y/N]` prompt (it reads config.json through AutoConfig).
    folder = user_folders / "short"
    code = f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained({str(folder)!r})
print("PAD", tok.pad_token_id)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    assert "PAD 127" in proc.stdout


def test_hub_id_without_a_reachable_hub_fails_fast(monkeypatch, tmp_path, capsys):
    import transformers_pipo.cli as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(cli, "_hub_offline", lambda: False)
    monkeypatch.setattr(cli, "_in_hub_cache", lambda repo_id: False)
    monkeypatch.setattr(cli, "_hub_reachable", lambda timeout=3.0: False)
    # Instead of about a minute of huggingface_hub retries: one line, at once.
    assert main(["generate", "--model", "org/some-model", "--prompt", "x"]) == 2
    assert capsys.readouterr().err == (
        "pipo generate: error: --model org/some-model: no such local folder, and the Hub cannot be reached to look "
        "it up\n"
    )
    monkeypatch.setattr(cli, "_hub_reachable", lambda timeout=3.0: True)
    cli.check_model_path("org/some-model", "--model")  # reachable: left to the Hub (no local verdict)
    monkeypatch.setattr(cli, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(cli, "_in_hub_cache", lambda repo_id: True)
    cli.check_model_path("org/some-model", "--model")  # cached: loadable offline


def test_a_cached_hub_id_passes_the_offline_check(monkeypatch, tmp_path):
    import transformers_pipo.cli as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_hub_offline", lambda: True)
    monkeypatch.setattr(cli, "_in_hub_cache", lambda repo_id: repo_id == "org/cached")
    cli.check_model_path("org/cached", "--model")
    with pytest.raises(cli.UsageError, match="org/other: no such folder and the Hub is offline"):
        cli.check_model_path("org/other", "--model")
