"""Two-step runs of both trainers through `accelerate launch` (CPU, one process) via the `pipo train` CLI, with
checkpoints that load as PIPO folders; plus the shipped accelerate configs parse."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_backbone_config
from pipo_task import pad_tokenizer, pattern_pipo, pattern_records
from transformers_pipo.training.launch import ACCELERATE_CONFIGS, accelerate_config


def _words(ids):
    return " ".join(f"w{t}" if t > 2 else {1: "<s>", 2: "</s>"}[t] for t in ids)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("accelerate")
    tok = pad_tokenizer()
    pattern_pipo(seed=0).save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3")).save_pretrained(root / "teacher")
    records = pattern_records(8, seed=3)
    with open(root / "sft.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"prompt": _words(r["prompt_ids"]), "response": _words(r["response_ids"])}) + "\n")
    with open(root / "prompts.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"prompt": _words(r["prompt_ids"])}) + "\n")
    (root / "cpu.yaml").write_text(accelerate_config("cpu"))
    return root


SCRIPT = """\
import sys
from transformers_pipo.cli import main

sft_args, opd_args = sys.argv[1].split(" "), sys.argv[2].split(" ")
assert main(["train", "sft", *sft_args]) == 0
assert main(["train", "opd", *opd_args]) == 0
"""


@pytest.fixture(scope="module")
def launched(workspace):
    """One `accelerate launch` (CPU, 1 process) running `pipo train sft` then `pipo train opd`, two steps each.

    One process for both keeps the test fast (the training stack takes ~15 s to import on a loaded 2-core box);
    the documented command form is `accelerate launch --config_file cpu.yaml -m transformers_pipo.cli train sft ...`.
    """
    root = workspace
    sft = (f"--model {root / 'student'} --train_file {root / 'sft.jsonl'} --output_dir {root / 'sft_out'} "
           "--max_steps 2 --per_device_train_batch_size 2 --logging_steps 1 --save_strategy steps --save_steps 1 "
           "--report_to none")
    opd = (f"--model {root / 'student'} --teacher {root / 'teacher'} --train_file {root / 'prompts.jsonl'} "
           f"--output_dir {root / 'opd_out'} --max_steps 2 --per_device_train_batch_size 2 --max_new_tokens 6 "
           "--pipo_confidence_threshold 0.5 --divergence full --train_mode lora --lora_r 4 --lora_alpha 8 "
           "--logging_steps 1 --save_strategy no --report_to none")
    (root / "run_both.py").write_text(SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / "cpu.yaml"),
           str(root / "run_both.py"), sft, opd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-4000:]}"
    blocks = proc.stdout.split('{\n  "steps"')[1:]
    assert len(blocks) == 2, proc.stdout[-4000:]
    summaries = [json.loads('{\n  "steps"' + b[: b.index("\n}") + 2]) for b in blocks]
    return {"sft": summaries[0], "opd": summaries[1], "stderr": proc.stderr, "root": root}


def test_sft_two_steps_under_accelerate_launch(launched):
    summary, out = launched["sft"], launched["root"] / "sft_out"
    assert summary["steps"] == 2
    assert {"backbone_loss", "mtp_loss", "confidence_loss"} <= set(summary["last_log"])
    assert "it/s" in launched["stderr"] or "s/it" in launched["stderr"]  # tqdm progress bar
    for folder in (out, out / "checkpoint-1", out / "checkpoint-2"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model).__name__ == "PipoForCausalLM", folder
        assert (folder / "modeling_pipo.py").exists()  # remote code travels with every checkpoint


def test_opd_two_steps_with_lora_under_accelerate_launch(launched):
    summary, out = launched["opd"], launched["root"] / "opd_out"
    assert summary["steps"] == 2
    assert {"divergence_backbone", "alpha_mean", "rollout_commit_rate", "rollout_length"} <= set(summary["last_log"])
    assert (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert type(merged).__name__ == "PipoForCausalLM"
    # The adapter names the PIPO folder it was trained on (absolute), so the standard calls load it.
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((launched["root"] / "student").resolve())
    adapted = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_cli_rejects_a_non_pipo_model_by_name(workspace, capsys):
    from transformers_pipo.cli import main

    assert main(["train", "sft", "--model", str(workspace / "teacher"), "--tokenizer", str(workspace / "student"),
                 "--train_file", str(workspace / "sft.jsonl"), "--output_dir", str(workspace / "x")]) == 2
    assert "not a PIPO one; pass --from_backbone" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("kind", sorted(ACCELERATE_CONFIGS))
def test_shipped_accelerate_configs_parse(tmp_path, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    path = tmp_path / f"{kind}.yaml"
    path.write_text(accelerate_config(kind, num_processes=1 if kind == "cpu" else 4))
    config = load_config_from_file(str(path))
    assert config.num_processes == (1 if kind == "cpu" else 4)
