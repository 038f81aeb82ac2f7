"""Stages 6-9: convert the student base to PIPO, SFT of the PIPO heads only (the "MTP" row), PIPO SFT, PIPO OPD.

Training goes through `transformers_pipo.training` (PipoSFTTrainer / PipoOPDTrainer); nothing is reimplemented.
"""

from __future__ import annotations

import time

from .common import PipelineConfig, read_jsonl, schedule_args
from .stages_base import load_model, load_tokenizer, opd_prompts


def _sft_records(cfg: PipelineConfig) -> list[dict]:
    return [{"prompt": r["prompt"], "response": r["response"]} for r in read_jsonl(cfg.path("data", "sft_teacher.jsonl"))]


def _finalise(model, tok, cfg: PipelineConfig, out, threshold: float) -> None:
    """Greedy, task-sized generation defaults (τ recorded) and save with the tokenizer."""
    gc = model.generation_config
    gc.pipo_confidence_threshold = threshold
    gc.max_new_tokens = cfg.max_new_tokens
    gc.do_sample = False
    gc.eos_token_id = tok.eos_token_id
    gc.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def stage_convert(cfg: PipelineConfig) -> dict:
    from transformers_pipo import PipoForCausalLM

    tok = load_tokenizer(cfg)
    base = load_model(cfg.path("models", "student_base"))
    pad_before = tok.pad_token_id
    model = PipoForCausalLM.from_backbone(base, tokenizer=tok, compressor_type=cfg.compressor_type,
                                           pipo_confidence_threshold=0.5)
    if tok.pad_token_id != pad_before:
        raise RuntimeError("the task tokenizer has a dedicated PAD; from_backbone should not have added one")
    _finalise(model, tok, cfg, cfg.path("models", "pipo_converted"), 0.5)
    return {"params": sum(p.numel() for p in model.parameters()), "pad_token_id": model.config.pad_token_id}


def _run_sft(cfg: PipelineConfig, name: str, train_mode: str, steps: int, lr: float,
             init: str = "pipo_converted", run_name: str | None = None) -> dict:
    from transformers_pipo.training import PipoSFTConfig, PipoSFTTrainer

    tok = load_tokenizer(cfg)
    tok.padding_side = "right"
    model = load_model(cfg.path("models", init))
    records = _sft_records(cfg)
    args = PipoSFTConfig(
        **schedule_args(cfg, run_name or name, steps),
        train_mode=train_mode,
        per_device_train_batch_size=cfg.sft_batch_size,
        learning_rate=lr,
        weight_decay=0.0,
        max_pad_ratio=0.25,
        pad_augmentation="split",
    )
    start = time.time()
    trainer = PipoSFTTrainer(model=model, args=args, train_dataset=records, processing_class=tok)
    result = trainer.train()
    merged = trainer.save_merged(str(cfg.path("models", name)))
    tok.padding_side = "left"
    _finalise(merged, tok, cfg, cfg.path("models", name), -1.0 if name == "pipo_mtp_only" else 0.5)
    return {
        "train_loss": result.training_loss,
        "steps": steps,
        "records": len(records),
        "seconds": round(time.time() - start, 1),
        "trainable": trainer.parameter_counts,
        "log": [h for h in trainer.state.log_history if "loss" in h],
    }


def stage_sft_mtp_only(cfg: PipelineConfig) -> dict:
    """Closest analogue of the paper's "MTP" row: after conversion only the PIPO modules (compressor, MTP head,
    confidence head) are trained on the teacher data, the backbone stays the token-level student base; evaluated
    with every draft committed unverified (τ < 0)."""
    return _run_sft(cfg, "pipo_mtp_only", "heads", cfg.mtp_only_steps, cfg.sft_lr)


def stage_sft(cfg: PipelineConfig) -> dict:
    return _run_sft(cfg, "pipo_sft", "full", cfg.sft_steps, cfg.sft_lr)


def stage_sft_more(cfg: PipelineConfig) -> dict:
    """Continued PIPO-SFT runs of `models/pipo_sft`, one per entry of `sft_more_steps` (each a new warm-up + cosine
    at `sft_more_lr`), saved over it: the backbone was still relearning its task on pair inputs when the first
    run's schedule ended. Finished runs are recorded in models/pipo_sft/sft_more.json and skipped on a re-run."""
    import json

    record = cfg.path("models", "pipo_sft", "sft_more.json")
    done = json.loads(record.read_text()) if record.exists() else []
    for r, steps in enumerate(cfg.sft_more_steps):
        if r < len(done) or steps <= 0:
            continue
        info = _run_sft(cfg, "pipo_sft", "full", steps, cfg.sft_more_lr, init="pipo_sft",
                        run_name=f"pipo_sft_more{r + 1}")
        info.pop("log", None)
        done.append({"round": r + 1, **info})
        record.write_text(json.dumps(done, indent=2))
    return {"rounds": done, "steps": sum(x["steps"] for x in done), "seconds": sum(x["seconds"] for x in done)}


def stage_opd(cfg: PipelineConfig) -> dict:
    from transformers_pipo.training import PipoOPDConfig, PipoOPDTrainer

    tok = load_tokenizer(cfg)
    student = load_model(cfg.path("models", "pipo_sft"))
    teacher = load_model(cfg.path("models", "teacher"))
    records = [{"prompt": p.prompt} for p in opd_prompts(cfg)]
    args = PipoOPDConfig(
        **schedule_args(cfg, "pipo_opd", cfg.opd_steps),
        train_mode="full",
        per_device_train_batch_size=cfg.opd_batch_size,
        learning_rate=cfg.opd_lr,
        weight_decay=0.0,
        max_new_tokens=cfg.max_new_tokens,
        pipo_confidence_threshold=cfg.opd_threshold,
        divergence="full",
        temperature=1.0,
        lmbda=1.0,
        beta=1.0,
    )
    start = time.time()
    trainer = PipoOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=records,
                             processing_class=tok)
    result = trainer.train()
    merged = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(merged, "merge_and_unload"):
        merged = merged.merge_and_unload()
    tok.padding_side = "left"
    _finalise(merged, tok, cfg, cfg.path("models", "pipo_opd"), 0.5)
    return {
        "train_loss": result.training_loss,
        "steps": cfg.opd_steps,
        "prompts": len(records),
        "seconds": round(time.time() - start, 1),
        "log": [h for h in trainer.state.log_history if "loss" in h],
    }
