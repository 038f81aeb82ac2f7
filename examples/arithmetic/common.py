"""Shared pieces of the arithmetic pipeline: configuration, artifact layout, data encoding, batched sampling."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from transformers_pipo.modeling_pipo import IGNORE_INDEX


@dataclass
class ModelSize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


@dataclass
class PipelineConfig:
    """Every knob of the pipeline (set from CLI flags by `run_pipeline.py`; `--quick` shrinks everything)."""

    out: str = "outputs/arithmetic"
    seed: int = 0
    threads: int = 1  # under CPU contention one thread per process is far faster than two
    # data
    n_train: int = 120_000
    n_val: int = 500
    n_test: int = 500
    # base models (Qwen3-style, trained from scratch as ordinary causal LMs)
    # Teacher and student have the same shape. The student base trains from scratch; the teacher is the student base
    # trained further on other problems (`teacher_init="student_base"`), so it is clearly stronger: the budget did
    # not allow a larger teacher from scratch (a 192×6 one ran at 5-6 s/step on the shared machine, see
    # results_notes.md). `teacher_init="scratch"` trains it from scratch instead.
    # Six layers: an eager PIPO step adds one decoder layer (the MTP head) and small heads to the backbone's layers,
    # so a deeper backbone gains more per step (4 layers gave 1.46-1.52x eager; results_notes.md, run 3).
    teacher: ModelSize = field(default_factory=lambda: ModelSize(128, 6, 4, 2, 384))
    student: ModelSize = field(default_factory=lambda: ModelSize(128, 6, 4, 2, 384))
    teacher_init: str = "student_base"
    teacher_steps: int = 350
    teacher_lr: float = 1e-3
    teacher_data_start: int = 0  # first train problem the teacher reads (disjoint from the student's slice)
    teacher_init_seed: int = 1  # added to `seed` for the weight initialisation (teacher_init="scratch")
    teacher_more_steps: int = 300  # continued runs on fresh problems (when the teacher is still improving)
    teacher_more_lr: float = 1e-3  # × 0.7 per further round
    teacher_more_rounds: int = 0
    teacher_round2_offset: int = 100_000  # round 2 reads train problems from here on
    student_steps: int = 1200
    student_data_start: int = 60_000
    # The base continued at a lower rate on problems nobody else reads (between the teacher's and the student's
    # slices); its loss was still falling when the first schedule ended. 0 = no continuation. The length sets how
    # strong the base is: 900 steps gave 69% greedy (the target range: clearly below the teacher, above 50%).
    student_more_steps: int = 900
    student_more_lr: float = 5e-4
    student_more_start: int = 20_000
    student_init_seed: int = 2
    base_batch_size: int = 32
    base_lr: float = 2e-3
    # teacher trajectories
    n_sample_prompts: int = 8000
    samples_per_prompt: int = 2
    sample_batch_size: int = 128
    max_new_tokens: int = 96  # the longest reference chain of thought is 85 tokens + EOS
    min_sft_records: int = 0  # top up with reference CoT when the teacher keeps fewer (smoke runs only)
    # "teacher": correct temperature-1.0 teacher samples; "reference": the reference chain of thought of the same
    # prompts (what a correct teacher sample of this deterministic format is), so SFT need not wait for the teacher
    sft_data: str = "reference"
    # PIPO conversion: the pair compressor (`PipoConfig.compressor_type`: "mlp", "linear" or "gated")
    compressor_type: str = "mlp"
    # PIPO SFT / OPD
    sft_steps: int = 700
    sft_batch_size: int = 16
    sft_lr: float = 1e-3
    sft_more_steps: tuple[int, ...] = (400, 800, 2500, 2500)  # continued PIPO-SFT runs (stage `sft_more`)
    sft_more_lr: float = 7e-4
    mtp_only_steps: int = 150
    n_opd_prompts: int = 6400
    opd_steps: int = 400
    opd_batch_size: int = 16
    opd_lr: float = 5e-4
    opd_threshold: float = 0.5
    # evaluation
    n_eval: int = 500
    n_sweep: int = 300
    eval_samples: int = 4
    eval_batch_size: int = 500
    thresholds: tuple[float, ...] = (-1.0, 0.5, 0.7, 0.9, 1.0)
    n_timing: int = 12
    speed_reps: int = 8  # interleaved passes over the timing problems in the `speed` stage (ratios vary ±0.05 at 2)
    # keys of stages_eval.SPEED_MODES measured by the `speed` stage: both sides eager, and both static + compiled
    speed_modes: tuple[str, ...] = ("eager", "static_compiled")
    shipped_threshold: float | None = None  # None: chosen from the sweep on the validation split
    # where the report and the embedded models go (relative to the repository root)
    docs_dir: str = "docs"
    assets_dir: str = "transformers_pipo/assets/arithmetic"
    notes_file: str = "examples/arithmetic/results_notes.md"  # hand-written "what was tried", appended to the report

    @property
    def root(self) -> Path:
        return Path(self.out)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def to_json(self) -> dict:
        return asdict(self)


def quick_config(out: str) -> PipelineConfig:
    """A minutes-long smoke configuration: same stages, toy sizes (numbers are meaningless)."""
    return PipelineConfig(
        out=out, n_train=3000, n_val=40, n_test=40,
        teacher=ModelSize(64, 2, 4, 2, 128), student=ModelSize(32, 2, 4, 2, 64),
        teacher_steps=30, teacher_data_start=1500, student_data_start=0, teacher_more_steps=10, teacher_more_rounds=1,
        teacher_round2_offset=2000, student_steps=20, student_more_steps=5, student_more_start=700, n_sample_prompts=64,
        sample_batch_size=32, min_sft_records=64, max_new_tokens=64,
        sft_steps=10, sft_more_steps=(3,), sft_batch_size=4, mtp_only_steps=5, n_opd_prompts=16, opd_steps=3,
        opd_batch_size=4,
        n_eval=16, eval_batch_size=16, thresholds=(-1.0, 0.5, 1.0), n_timing=2, speed_reps=1, speed_modes=("eager",),
        docs_dir=f"{out}/docs", assets_dir=f"{out}/assets", notes_file=f"{out}/notes.md",
    )


# ----------------------------------------------------------------------------------------------------------------------
# Stage bookkeeping
# ----------------------------------------------------------------------------------------------------------------------


def schedule_args(cfg: PipelineConfig, name: str, steps: int) -> dict:
    """`TrainingArguments` fields every training stage shares: a cosine schedule with 5% warm-up over `steps`, logging
    20 times, CPU, no checkpoints, no reporting, the pipeline seed, and the run folder `runs/<name>`."""
    return dict(
        output_dir=str(cfg.path("runs", name)),
        max_steps=steps,
        warmup_steps=max(1, steps // 20),
        lr_scheduler_type="cosine",
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=cfg.seed,
    )


def marker(cfg: PipelineConfig, stage: str) -> Path:
    return cfg.path("markers", f"{stage}.done.json")


def is_done(cfg: PipelineConfig, stage: str) -> bool:
    return marker(cfg, stage).exists()


def mark_done(cfg: PipelineConfig, stage: str, info: dict) -> None:
    path = marker(cfg, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"stage": stage, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **info}, indent=2))
    os.replace(tmp, path)


def read_marker(cfg: PipelineConfig, stage: str) -> dict:
    return json.loads(marker(cfg, stage).read_text())


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------------------


def encode_example(tokenizer, prompt: str, response: str) -> dict:
    """Prompt + response + EOS, labels -100 on the prompt (unshifted labels: `labels[t] = x[t]`)."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r}


class CausalLMCollator:
    """Right-pads `input_ids`/`labels` for ordinary causal-LM training (HF shifts the labels itself)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def left_pad(tokenizer, prompts: list[str]) -> dict:
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def decode_new(tokenizer, sequences: torch.Tensor, prompt_width: int) -> list[str]:
    """Decode generated continuations (special tokens, i.e. PAD and EOS, dropped; text cut at EOS)."""
    texts = []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for row in sequences[:, prompt_width:].tolist():
        if eos in row:
            row = row[: row.index(eos)]
        texts.append(tokenizer.decode([t for t in row if t != pad], skip_special_tokens=True))
    return texts


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
