"""`pipo train` as a user meets it: every folder a run reports loads offline with the standard call for its kind
(LoRA adapters included), OPD with a teacher one vocabulary row short of a from_backbone student, data in the forms
trl users bring (JSON/JSONL/parquet/save_to_disk/Hub id, YAML --config, --model_name_or_path), bit-identical resume,
model cards that record the run, and a 2-process CPU accelerate config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tokenizer, tiny_backbone_config
from pipo_task import pattern_records
from transformers_pipo.cli import main

# The backbone's vocabulary is exactly the tokenizer's (ids 0..126), so from_backbone must append the PAD as id 127
# and grow the student to 128 rows: the layout of a real checkpoint whose tokenizer has no spare row.
BACKBONE_VOCAB = 127


def _words(ids):
    return " ".join(f"w{t}" if t > 2 else {1: "<s>", 2: "</s>"}[t] for t in ids)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3", vocab_size=BACKBONE_VOCAB))
    backbone.save_pretrained(root / "backbone")
    tok = make_tokenizer(BACKBONE_VOCAB + 1)
    assert len(tok) == BACKBONE_VOCAB
    tok.save_pretrained(root / "backbone")
    records = [{"prompt": _words(r["prompt_ids"]), "completion": _words(r["response_ids"])}
               for r in pattern_records(12, seed=3)]
    with open(root / "sft.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return {"root": root, "records": records}


def _run(args, capsys) -> dict:
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    return json.loads(out[out.index('{\n  "steps"'):])


@pytest.fixture(scope="module")
def lora_run(workspace):
    """`pipo train sft --from_backbone --train_mode lora` (in-process, 3 steps, a checkpoint per step)."""
    root = workspace["root"]
    out = root / "lora"
    args = ["train", "sft", "--model_name_or_path", str(root / "backbone"), "--from_backbone",
            "--dataset_name", str(root / "sft.jsonl"), "--output_dir", str(out), "--train_mode", "lora",
            "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--learning_rate", "5e-2", "--max_steps", "3",
            "--per_device_train_batch_size", "4", "--save_steps", "1", "--save_total_limit", "2", "--report_to", "none",
            "--use_cpu", "--disable_tqdm", "true", "--commit_rate_prompts", "2", "--logging_steps", "1"]
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert main(args) == 0
    text = buffer.getvalue()
    summary = json.loads(text[text.index('{\n  "steps"'):])
    return {"out": out, "summary": summary}


LOAD_SCRIPT = r"""
import json, sys, torch
import transformers_pipo  # noqa: F401  (as a user of the package would)
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer
ids = torch.tensor([[1, 5, 10, 11, 12, 13]])
def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].tolist()
result = {}
for kind, folder in json.loads(sys.argv[1]):
    if kind == "adapter":
        result[folder + ":auto_peft"] = logits(AutoPeftModelForCausalLM.from_pretrained(folder))
    result[folder + ":auto"] = logits(AutoModelForCausalLM.from_pretrained(folder))
    AutoTokenizer.from_pretrained(folder)
print("RESULT" + json.dumps(result))
"""


def test_every_reported_lora_folder_loads_offline(lora_run, tmp_path):
    out, saved = lora_run["out"], lora_run["summary"]["saved"]
    # Reported: the adapter (top level), the merged PIPO folder, and the base the adapters were trained on.
    assert saved["merged"] == str(out / "merged") and saved["base"] == str((out / "base").resolve())
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str((out / "base").resolve())
    checkpoints = sorted(p for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-3"]
    for ckpt in checkpoints:
        assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == saved["base"]
    folders = [("adapter", str(out)), ("adapter", str(checkpoints[-1])), ("plain", str(out / "merged")),
               ("plain", saved["base"])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps(folders)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)  # another working directory: no relative paths
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    adapter, merged, base = (torch.tensor(result[f"{out}{s}"]) for s in (":auto_peft", "/merged:auto", ":auto"))
    torch.testing.assert_close(adapter, merged, atol=1e-4, rtol=1e-4)  # adapter on its base == merged weights
    torch.testing.assert_close(base, merged, atol=1e-4, rtol=1e-4)  # AutoModelForCausalLM(adapter) applies it too
    untrained = torch.tensor(result[saved["base"] + ":auto"])
    assert (untrained - merged).abs().max() > 1e-3  # ... and the adapter really changed the model
    torch.testing.assert_close(torch.tensor(result[f"{checkpoints[-1]}:auto_peft"]), adapter)  # last ckpt == final


def test_pipo_generate_runs_on_the_adapter_folder(lora_run, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(["pipo", "generate", "--model", str(lora_run["out"]), "--prompt", "w5 w10 w11",
                           "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backbone steps, commit rate" in proc.stderr


def test_cards_record_the_run_and_no_local_path(lora_run):
    out = lora_run["out"]
    card = (out / "merged" / "README.md").read_text()
    assert "| Training stages | 1. SFT (lora r=4, 3 steps, data sft.jsonl, PAD augmentation split) |" in card
    rate = lora_run["summary"]["commit_rate"]
    assert f"| Measured commit rate | {rate:.1%} (greedy, τ=0.95, 2 prompts" in card
    config = json.loads((out / "merged" / "config.json").read_text())
    assert config["pipo_training_stages"] == ["SFT (lora r=4, 3 steps, data sft.jsonl, PAD augmentation split)"]
    assert "| Base model | a local checkpoint (not on the Hub) |" in card
    for readme in (out / "merged" / "README.md", out / "README.md", out / "checkpoint-3" / "README.md"):
        assert str(out.parent) not in readme.read_text(), readme  # no local path, in our card or peft's


def test_opd_accepts_a_teacher_whose_vocabulary_is_a_prefix(workspace, lora_run, capsys):
    root = workspace["root"]
    student = lora_run["out"] / "merged"
    assert AutoModelForCausalLM.from_pretrained(student).get_output_embeddings().weight.shape[0] == BACKBONE_VOCAB + 1
    summary = _run(["train", "opd", "--model", str(student), "--teacher", str(root / "backbone"), "--dataset_name",
                    str(root / "sft.jsonl"), "--output_dir", str(root / "opd"), "--max_steps", "1",
                    "--per_device_train_batch_size", "2", "--max_new_tokens", "6", "--divergence", "full",
                    "--pipo_confidence_threshold", "-1", "--report_to", "none", "--save_strategy", "no", "--use_cpu",
                    "--disable_tqdm", "true", "--commit_rate_prompts", "0", "--logging_steps", "1"], capsys)
    assert summary["steps"] == 1
    log = summary["last_log"]
    for key in ("loss", "divergence_backbone", "divergence_mtp"):  # the student-only row (PAD) got -inf teacher
        assert log[key] == log[key] and abs(log[key]) != float("inf"), key  # logits and is masked: no NaN/inf
    config = json.loads((root / "opd" / "config.json").read_text())
    assert config["pipo_training_stages"][-1].startswith("OPD (full, 1 steps")


def test_opd_refuses_a_teacher_with_another_vocabulary(workspace, lora_run, tmp_path, capsys):
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3", vocab_size=200)).save_pretrained(tmp_path / "big")
    code = main(["train", "opd", "--model", str(lora_run["out"] / "merged"), "--teacher", str(tmp_path / "big"),
                 "--dataset_name", str(workspace["root"] / "sft.jsonl"), "--output_dir", str(tmp_path / "o"),
                 "--max_steps", "1", "--report_to", "none", "--use_cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the progress bars of the teacher's saving)
    assert code == 2
    assert err.startswith("pipo train opd: error: the teacher ")
    assert "200 vocabulary rows but the student only 128" in err and "tokenizer" in err

    # Fewer rows but a different tokenizer: not a prefix.
    small = tmp_path / "shuffled"
    AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3", vocab_size=100)).save_pretrained(small)
    tok = make_tokenizer(101)
    vocab = tok.get_vocab()
    swapped = {t: (7 if i == 8 else 8 if i == 7 else i) for t, i in vocab.items()}
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(vocab=swapped, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(small)
    code = main(["train", "opd", "--model", str(lora_run["out"] / "merged"), "--teacher", str(small),
                 "--dataset_name", str(workspace["root"] / "sft.jsonl"), "--output_dir", str(tmp_path / "o2"),
                 "--max_steps", "1", "--report_to", "none", "--use_cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "not a prefix of the student's" in err and "Use a teacher that shares" in err


def _sft_args(root, model, out, *extra):
    return ["train", "sft", "--model", str(model), "--output_dir", str(out), "--per_device_train_batch_size", "2",
            "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--commit_rate_prompts", "0",
            "--logging_steps", "1", *extra]


def test_resume_true_is_bit_identical_to_an_uninterrupted_run(workspace, lora_run, capsys):
    from safetensors.torch import load_file

    root, model = workspace["root"], lora_run["out"] / "merged"
    common = ["--dataset_name", str(root / "sft.jsonl"), "--max_steps", "4", "--save_steps", "2",
              "--max_pad_ratio", "0.5", "--learning_rate", "1e-2", "--save_only_model", "false"]
    _run(_sft_args(root, model, root / "straight", *common), capsys)
    _run(_sft_args(root, model, root / "resumed", *common), capsys)
    # Interrupt after step 2: the later checkpoint and the final weights are gone.
    import shutil

    shutil.rmtree(root / "resumed" / "checkpoint-4")
    (root / "resumed" / "model.safetensors").unlink()
    summary = _run(_sft_args(root, model, root / "resumed", *common, "--resume_from_checkpoint", "true"), capsys)
    assert summary["steps"] == 4
    a = load_file(root / "straight" / "model.safetensors")
    b = load_file(root / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_true_without_a_checkpoint_is_a_user_error(workspace, lora_run, tmp_path, capsys):
    code = main(_sft_args(workspace["root"], lora_run["out"] / "merged", tmp_path / "none", "--dataset_name",
                          str(workspace["root"] / "sft.jsonl"), "--resume_from_checkpoint", "true"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith(f"no checkpoint-* folder in {tmp_path / 'none'}")


def test_yaml_config_parquet_data_and_model_name_or_path(workspace, lora_run, tmp_path, capsys):
    from datasets import Dataset

    Dataset.from_list(workspace["records"]).to_parquet(str(tmp_path / "train.parquet"))
    (tmp_path / "run.yaml").write_text(
        f"model_name_or_path: {lora_run['out'] / 'merged'}\n"
        f"dataset_name: {tmp_path / 'train.parquet'}\n"
        "max_steps: 5\nlearning_rate: 0.001\ntrain_mode: heads\nreport_to: none\nuse_cpu: true\n"
        "save_strategy: 'no'\ncommit_rate_prompts: 0\nper_device_train_batch_size: 2\ndisable_tqdm: true\n"
    )
    # A command-line flag wins over the file (max_steps 1, not 5).
    summary = _run(["train", "sft", "--config", str(tmp_path / "run.yaml"), "--output_dir", str(tmp_path / "o"),
                    "--max_steps", "1"], capsys)
    assert summary["steps"] == 1
    (tmp_path / "bad.yaml").write_text("max_step: 3\n")
    assert main(["train", "sft", "--config", str(tmp_path / "bad.yaml"), "--output_dir", "x"]) == 2
    assert "unknown key --max_step (did you mean --max_steps?)" in capsys.readouterr().err


def test_data_forms_give_the_same_records(workspace, tmp_path, monkeypatch):
    import datasets

    from transformers_pipo.training import load_records

    tok = make_tokenizer(BACKBONE_VOCAB + 1)
    records = workspace["records"]
    expected = load_records(workspace["root"] / "sft.jsonl", tok)
    (tmp_path / "array.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "data.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "disk"))

    def strip(rs):
        return [(r["prompt_ids"], r["response_ids"]) for r in rs]

    for name in ("array.json", "data.parquet", "disk"):
        assert strip(load_records(tmp_path / name, tok)) == strip(expected), name
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_records(tmp_path / "disk", tok, split="validation")

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(records)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert strip(load_records("org/chat-data", tok, dataset_config="default", split="train[:50%]")) == strip(expected)
    assert calls == [("org/chat-data", "default", "train[:50%]")]


def test_train_help_lists_pipo_flags_first_with_one_spelling_each():
    import re

    from transformers_pipo.commands.train import build_train_parser

    for command in ("sft", "opd"):
        parser, _, _ = build_train_parser(command)
        text = parser.format_help()
        assert text.index("--model MODEL") < text.index("--mtp_loss_weight") < text.index("--learning_rate")
        assert text.index("--dataset_name") < text.index("--output_dir")
        spellings: dict[str, set[str]] = {}
        for option, action in parser._option_string_actions.items():
            spellings.setdefault(re.sub(r"[-_]", "", option).lower(), set()).add(action.dest)
        assert not {k: v for k, v in spellings.items() if len(v) > 1}, command
    parser, _, _ = build_train_parser("opd")
    assert "--divergence_topk" in parser._option_string_actions and "--topk" not in parser._option_string_actions


def test_accelerate_config_cpu_with_two_processes(tmp_path):
    (tmp_path / "cpu2.yaml").write_text(
        subprocess.run(["pipo", "train", "accelerate-config", "cpu", "--num_processes", "2"], capture_output=True,
                       text=True, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    )
    (tmp_path / "who.py").write_text(
        # cpu=True as in a Trainer run with --use_cpu true
        "from accelerate import PartialState\nimport torch.distributed as dist\ns = PartialState(cpu=True)\n"
        "from pathlib import Path\n"
        "Path(f'rank{s.process_index}.txt').write_text(\n"
        "    f'{s.process_index} {s.num_processes} {dist.get_backend() if dist.is_initialized() else None}')\n"
    )
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(tmp_path / "cpu2.yaml"), str(tmp_path / "who.py")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one file per rank: the two processes' stdout lines may interleave mid-line
    ranks = sorted(tuple(f.read_text().split()) for f in tmp_path.glob("rank*.txt"))
    assert ranks == [("0", "2", "gloo"), ("1", "2", "gloo")], proc.stdout


def test_resume_does_not_warn_about_the_tied_lm_head(tmp_path, monkeypatch):
    import transformers.trainer
    from torch.nn.modules.module import _IncompatibleKeys

    from conftest import tiny_pipo
    from pipo_task import pad_tokenizer
    from transformers_pipo.training import PipoSFTConfig, PipoSFTTrainer

    model = tiny_pipo("qwen3")  # tied embeddings: the checkpoint holds no lm_head.weight
    assert model.lm_head.weight is model.get_input_embeddings().weight
    args = PipoSFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    trainer = PipoSFTTrainer(model=model, args=args, train_dataset=[{"prompt_ids": [1, 5], "response_ids": [6, 7]}],
                             processing_class=pad_tokenizer())
    warnings_logged = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda msg, *a, **k: warnings_logged.append(msg))
    trainer._issue_warnings_after_load(_IncompatibleKeys(missing_keys=["lm_head.weight"], unexpected_keys=[]))
    assert warnings_logged == []
    trainer._issue_warnings_after_load(_IncompatibleKeys(missing_keys=["model.compressor.mlp.0.weight"], unexpected_keys=[]))
    assert len(warnings_logged) == 1 and "model.compressor.mlp.0.weight" in warnings_logged[0]  # real gaps still warn
