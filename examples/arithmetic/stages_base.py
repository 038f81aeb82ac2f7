"""Stages 1-5: data splits, tokenizer, teacher and student base (ordinary causal LMs from scratch), teacher sampling."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from . import task
from .common import (
    CausalLMCollator,
    ModelSize,
    PipelineConfig,
    decode_new,
    encode_example,
    is_done,
    left_pad,
    read_jsonl,
    schedule_args,
    write_jsonl,
)
from .tokenizer import corpus, train_tokenizer


def stage_data(cfg: PipelineConfig) -> dict:
    splits = task.make_splits(cfg.seed, cfg.n_train, cfg.n_val, cfg.n_test)
    for name, problems in splits.items():
        write_jsonl(cfg.path("data", f"{name}.jsonl"),
                    ({"expression": p.expression, "answer": p.answer} for p in problems))
    return {name: len(p) for name, p in splits.items()}


def load_split(cfg: PipelineConfig, name: str) -> list[task.Problem]:
    return [task.Problem(r["expression"], r["answer"]) for r in read_jsonl(cfg.path("data", f"{name}.jsonl"))]


def stage_tokenizer(cfg: PipelineConfig) -> dict:
    train = load_split(cfg, "train")
    tok = train_tokenizer(corpus(train, task.chain_of_thought))
    missing = [c for c in task.ALPHABET if c not in tok.get_vocab()]
    if missing:
        raise RuntimeError(f"tokenizer vocabulary misses {missing}")
    tok.save_pretrained(cfg.path("tokenizer"))
    return {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}


def load_tokenizer(cfg: PipelineConfig, path=None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path or cfg.path("tokenizer"))
    tok.padding_side = "left"
    return tok


def backbone_config(size: ModelSize, tok):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tok),
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        head_dim=size.hidden_size // size.num_attention_heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def length_bucketed_batches(rows: list[dict], batch_size: int, seed: int, pool: int = 50) -> list[list[dict]]:
    """Batches of similar-length rows (sorted inside pools of `pool` batches), in random order: less padding."""
    import random

    rng = random.Random(seed)
    rows = list(rows)
    rng.shuffle(rows)
    batches = []
    for start in range(0, len(rows), batch_size * pool):
        chunk = sorted(rows[start: start + batch_size * pool], key=lambda r: len(r["input_ids"]))
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class _FlattenCollator:
    def __init__(self, inner):
        self.inner = inner

    def __call__(self, items):
        return self.inner([row for batch in items for row in batch])


def _fit_causal_lm(cfg: PipelineConfig, model, tok, rows: list[dict], run_name: str, steps: int, lr: float,
                   batch_size: int, *, weight_decay: float, batch_seed: int):
    """One `Trainer` run of ordinary causal-LM training over length-bucketed batches of encoded `rows` (warm-up +
    cosine over `steps`, see `schedule_args`); returns the trainer and its train result."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        **schedule_args(cfg, run_name, steps),
        per_device_train_batch_size=1,  # one item = one pre-built, length-bucketed batch
        learning_rate=lr,
        weight_decay=weight_decay,
    )
    batches = length_bucketed_batches(rows, batch_size, batch_seed)
    trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(batches),
                      data_collator=_FlattenCollator(CausalLMCollator(tok.pad_token_id)))
    return trainer, trainer.train()


def _save_regular(cfg: PipelineConfig, model, tok, out) -> None:
    """Save a regular (token-by-token) model with the task's greedy generation defaults and the tokenizer."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=cfg.max_new_tokens,
        do_sample=False,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _train_base(cfg: PipelineConfig, name: str, size: ModelSize, steps: int, *, resume: bool = False,
                lr: float | None = None, offset: int = 0, absolute: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(cfg)
    teacher = name == "teacher"
    torch.manual_seed(cfg.seed + (cfg.teacher_init_seed if teacher else cfg.student_init_seed) + 10 * int(resume))
    if resume:
        model = AutoModelForCausalLM.from_pretrained(cfg.path("models", name))
    elif teacher and cfg.teacher_init == "student_base":
        model = AutoModelForCausalLM.from_pretrained(cfg.path("models", "student_base"))
        lr = lr or cfg.teacher_lr
    elif teacher and cfg.teacher_init != "scratch":
        raise ValueError(f"teacher_init must be 'scratch' or 'student_base', not {cfg.teacher_init!r}")
    else:
        model = AutoModelForCausalLM.from_config(backbone_config(size, tok))
    n_examples = steps * cfg.base_batch_size
    train = load_split(cfg, "train")
    # The teacher and the student read disjoint slices of the train split; the last `n_opd_prompts +
    # n_sample_prompts` problems are reserved for OPD and SFT prompts.
    start = offset if absolute else (cfg.teacher_data_start if teacher else cfg.student_data_start) + offset
    limit = len(train) - cfg.n_sample_prompts - cfg.n_opd_prompts
    if start + n_examples > limit:
        raise RuntimeError(f"{name}: {steps} steps need train problems {start}..{start + n_examples}, past the "
                           f"reserved prompts at {limit}")
    rows = [encode_example(tok, p.prompt, task.chain_of_thought(p.expression))
            for p in train[start: start + n_examples]]
    start_time = time.time()
    trainer, result = _fit_causal_lm(cfg, model, tok, rows, name, steps, lr or cfg.base_lr, cfg.base_batch_size,
                                     weight_decay=0.01, batch_seed=cfg.seed)
    _save_regular(cfg, model, tok, cfg.path("models", name))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "train_loss": result.training_loss,
        "steps": steps,
        "examples": len(rows),
        "seconds": round(time.time() - start_time, 1),
        "log": [h for h in trainer.state.log_history if "loss" in h],
    }


def stage_train_teacher(cfg: PipelineConfig) -> dict:
    """The teacher: from scratch, or (`teacher_init="student_base"`) the trained student base continued for
    `teacher_steps` on its own slice of problems."""
    if cfg.teacher_init == "student_base":
        if not is_done(cfg, "train_student"):
            raise RuntimeError("teacher_init='student_base' needs the train_student stage first")
    info = _train_base(cfg, "teacher", cfg.teacher, cfg.teacher_steps)
    info["init"] = cfg.teacher_init
    return info


def stage_train_teacher_more(cfg: PipelineConfig) -> dict:
    """Continue the teacher in `teacher_more_rounds` further Trainer runs on problems it has not seen (when its loss
    is still falling). Round 1 reads the problems right after the teacher's slice, later rounds those from
    `teacher_round2_offset` on. Finished rounds are recorded in models/teacher/rounds.json and skipped on a re-run."""
    import json

    record = cfg.path("models", "teacher", "rounds.json")
    rounds = json.loads(record.read_text()) if record.exists() else []
    per_round = cfg.teacher_more_steps * cfg.base_batch_size
    for r in range(len(rounds) + 1, cfg.teacher_more_rounds + 1):
        if r == 1:
            offset = cfg.teacher_steps * cfg.base_batch_size
        else:  # after the student's slice of the second half
            offset = cfg.teacher_round2_offset + (r - 2) * per_round
        info = _train_base(cfg, "teacher", cfg.teacher, cfg.teacher_more_steps, resume=True,
                           lr=cfg.teacher_more_lr * (0.7 ** (r - 1)), offset=offset, absolute=r > 1)
        info.pop("log", None)
        rounds.append({"round": r, "offset": offset, **info})
        record.write_text(json.dumps(rounds, indent=2))
    return {"rounds": rounds, "steps": sum(x["steps"] for x in rounds), "seconds": sum(x["seconds"] for x in rounds)}


def stage_train_student(cfg: PipelineConfig) -> dict:
    return _train_base(cfg, "student_base", cfg.student, cfg.student_steps)


def stage_train_student_more(cfg: PipelineConfig) -> dict:
    """Continue the student base for `student_more_steps` at `student_more_lr` (a new warm-up + cosine) on problems
    from `student_more_start` on, saved over models/student_base: one longer base training in two schedules."""
    if cfg.student_more_steps <= 0:
        return {"steps": 0, "seconds": 0}
    return _train_base(cfg, "student_base", cfg.student, cfg.student_more_steps, resume=True,
                       lr=cfg.student_more_lr, offset=cfg.student_more_start, absolute=True)


def stage_train_student_matched(cfg: PipelineConfig) -> dict:
    """Control row for the training budget: the student base continued as an ordinary causal LM on exactly the
    records, batch size, step counts and learning-rate schedule of PIPO-SFT (`sft_steps` at `sft_lr`, then each of
    `sft_more_steps` at `sft_more_lr`). PIPO-SFT trains the converted student much further than the base was trained;
    this row says how much of PIPO's accuracy comes from that extra training rather than from the pair format.
    Finished runs are recorded in models/student_matched/rounds.json and skipped on a re-run (a longer
    `sft_more_steps` only trains the new runs)."""
    import json

    from transformers import AutoModelForCausalLM

    if not is_done(cfg, "train_student") or not is_done(cfg, "sample_teacher"):
        raise RuntimeError("train_student_matched needs the train_student and sample_teacher stages first")
    tok = load_tokenizer(cfg)
    records = read_jsonl(cfg.path("data", "sft_teacher.jsonl"))
    encoded = [encode_example(tok, r["prompt"], r["response"]) for r in records]
    out = cfg.path("models", "student_matched")
    record = out / "rounds.json"
    runs = json.loads(record.read_text()) if record.exists() else []
    model = AutoModelForCausalLM.from_pretrained(out if runs else cfg.path("models", "student_base"))
    schedule = [(cfg.sft_steps, cfg.sft_lr)] + [(s, cfg.sft_more_lr) for s in cfg.sft_more_steps if s > 0]
    if [(r["steps"], r["learning_rate"]) for r in runs] != schedule[: len(runs)]:
        raise RuntimeError(f"{record} records other runs than the schedule {schedule}; remove models/student_matched")
    for r, (steps, lr) in enumerate(schedule):
        if r < len(runs):
            continue
        start_time = time.time()
        torch.manual_seed(cfg.seed + 100 + r)
        rows = [encoded[i % len(encoded)] for i in range(steps * cfg.sft_batch_size)]  # whole epochs over the records
        _, result = _fit_causal_lm(cfg, model, tok, rows, f"student_matched{r}", steps, lr, cfg.sft_batch_size,
                                   weight_decay=0.0, batch_seed=cfg.seed + r)
        runs.append({"steps": steps, "learning_rate": lr, "train_loss": result.training_loss,
                     "seconds": round(time.time() - start_time, 1)})
        _save_regular(cfg, model, tok, out)
        record.write_text(json.dumps(runs, indent=2))
    return {"runs": runs, "records": len(records), "steps": sum(x["steps"] for x in runs),
            "seconds": round(sum(x.get("seconds", 0) for x in runs), 1)}


def load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


def _order_by_difficulty(problems: list[task.Problem]) -> list[int]:
    """Indices ordered by the number of operators (a proxy for response length, read from the prompt only), so that
    a generation batch holds responses of similar length."""
    def key(i: int) -> tuple[int, int]:
        e = problems[i].expression
        return e.count("+") + e.count("-"), len(e)

    return sorted(range(len(problems)), key=key)


@torch.no_grad()
def sample_responses(model, tok, problems: list[task.Problem], *, do_sample: bool, n_samples: int, batch_size: int,
                     max_new_tokens: int, desc: str, seed: int = 0, **gen_kwargs) -> list[list[str]]:
    """`n_samples` responses per problem with plain HF `generate` (batched, left-padded). Returns texts per problem."""
    order = _order_by_difficulty(problems)
    jobs = [(i, s) for i in order for s in range(n_samples)]
    texts: list[list[str]] = [[""] * n_samples for _ in problems]
    torch.manual_seed(seed)
    for start in tqdm(range(0, len(jobs), batch_size), desc=desc, unit="batch"):
        chunk = jobs[start: start + batch_size]
        enc = left_pad(tok, [problems[i].prompt for i, _ in chunk])
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, **gen_kwargs)
        if do_sample:
            kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
        out = model.generate(**enc, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        for (i, s), text in zip(chunk, decode_new(tok, sequences, enc["input_ids"].shape[1])):
            texts[i][s] = text
    return texts


def stage_sample_teacher(cfg: PipelineConfig) -> dict:
    """Sample teacher trajectories (temperature 1.0) on train prompts; keep the correct ones as PIPO SFT data. With
    `sft_data="reference"` the reference chain of thought of the same prompts is written instead (no teacher)."""
    tok = load_tokenizer(cfg)
    train = load_split(cfg, "train")
    # Prompts from the end of the train split: disjoint from the OPD prompts, which are taken just before them.
    problems = train[len(train) - cfg.n_sample_prompts:]
    if cfg.sft_data == "reference":
        rows = [{"prompt": p.prompt, "response": task.chain_of_thought(p.expression), "expression": p.expression,
                 "reference": True} for p in problems]
        write_jsonl(cfg.path("data", "sft_teacher.jsonl"), rows)
        lengths = [len(tok(r["response"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]
        return {"sampled": 0, "kept": 0, "reference_top_up": len(rows), "teacher_sample_accuracy": float("nan"),
                "mean_response_tokens": sum(lengths) / max(1, len(lengths)), "sft_data": "reference"}
    if cfg.sft_data != "teacher":
        raise ValueError(f"sft_data must be 'teacher' or 'reference', not {cfg.sft_data!r}")
    teacher = load_model(cfg.path("models", "teacher"))
    texts = sample_responses(teacher, tok, problems, do_sample=True, n_samples=cfg.samples_per_prompt,
                             batch_size=cfg.sample_batch_size, max_new_tokens=cfg.max_new_tokens,
                             desc="teacher sampling", seed=cfg.seed)
    rows, n_total = [], 0
    for problem, samples in zip(problems, texts):
        for text in samples:
            n_total += 1
            if task.is_correct(text, problem.expression):
                rows.append({"prompt": problem.prompt, "response": text, "expression": problem.expression})
    n_teacher = len(rows)
    for problem in problems[: max(0, cfg.min_sft_records - n_teacher)]:
        rows.append({"prompt": problem.prompt, "response": task.chain_of_thought(problem.expression),
                     "expression": problem.expression, "reference_top_up": True})
    write_jsonl(cfg.path("data", "sft_teacher.jsonl"), rows)
    lengths = [len(tok(r["response"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]
    return {"sampled": n_total, "kept": n_teacher, "reference_top_up": len(rows) - n_teacher,
            "teacher_sample_accuracy": n_teacher / max(1, n_total),
            "mean_response_tokens": sum(lengths) / max(1, len(lengths))}


def opd_prompts(cfg: PipelineConfig) -> list[task.Problem]:
    train = load_split(cfg, "train")
    end = len(train) - cfg.n_sample_prompts
    return train[end - cfg.n_opd_prompts: end]


__all__ = [name for name in dir() if name.startswith("stage_")] + ["load_split", "load_tokenizer", "sample_responses"]
