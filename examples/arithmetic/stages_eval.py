"""Stages 10-12: evaluation (τ sweep, Table-1-style rows, side-by-side timing, confidence reliability), the results
report (docs/RESULTS.md + plots) and the export of the embedded demo models into the package."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from transformers_pipo.demo import save_embedded_model
from transformers_pipo.generation_pipo import commit_rate
from transformers_pipo.modeling_pipo import IGNORE_INDEX

from . import task
from .common import PipelineConfig, decode_new, is_done, left_pad, read_marker, write_jsonl
from .stages_base import _order_by_difficulty, load_model, load_split, load_tokenizer

ROWS = [
    # key, label, model dir, decoding ("regular" or "pipo"), τ ("shipped" = chosen on validation)
    ("student_regular", "Student base, regular decoding", "student_base", "regular", None),
    ("student_matched", "Student base + PIPO-SFT's training budget (regular SFT, same data and steps)",
     "student_matched", "regular", None),
    ("mtp_unverified", "MTP draft accepted unverified (heads-only SFT, τ<0)", "pipo_mtp_only", "pipo", -1.0),
    ("pipo_sft", "PIPO-SFT", "pipo_sft", "pipo", "shipped"),
    ("pipo_sft_opd", "PIPO-SFT+OPD", "pipo_opd", "pipo", "shipped"),
    ("teacher", "Teacher, regular decoding", "teacher", "regular", None),
]


def _is_pipo(model) -> bool:
    return getattr(model.config, "model_type", None) == "pipo"


@torch.inference_mode()
def generate_stats(model, tok, problems: list[task.Problem], *, n_samples: int, do_sample: bool, batch_size: int,
                   max_new_tokens: int, tau: float | None = None, seed: int = 0, desc: str = "generate") -> dict:
    """Generate `n_samples` responses per problem (batched) and collect correctness and PIPO statistics.

    Returns `correct[i][s]`, totals of real tokens (EOS included), backbone steps and committed drafts, and the
    wall time. Regular decoding takes one backbone step per token.
    """
    order = _order_by_difficulty(problems)
    jobs = [(i, s) for i in order for s in range(n_samples)]
    correct = [[False] * n_samples for _ in problems]
    texts = [[""] * n_samples for _ in problems]
    tokens = steps = committed = 0
    torch.manual_seed(seed)
    pipo = _is_pipo(model)
    start = time.perf_counter()
    for b in tqdm(range(0, len(jobs), batch_size), desc=desc, unit="batch", leave=False):
        chunk = jobs[b: b + batch_size]
        enc = left_pad(tok, [problems[i].prompt for i, _ in chunk])
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, return_dict_in_generate=True)
        if do_sample:
            kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
        if pipo:
            kwargs["pipo_confidence_threshold"] = tau
        out = model.generate(**enc, **kwargs)
        width = enc["input_ids"].shape[1]
        new = out.sequences[:, width:]
        n_real = []
        for row in new.tolist():
            n = len(row)
            if tok.eos_token_id in row:
                n = row.index(tok.eos_token_id) + 1
            n_real.append(sum(1 for t in row[:n] if t != tok.pad_token_id))
        tokens += sum(n_real)
        if pipo:
            steps += int(out.decode_steps.sum())
            committed += int(out.committed_drafts.sum())
        else:
            steps += sum(n_real)
        for (i, s), text in zip(chunk, decode_new(tok, out.sequences, width)):
            texts[i][s] = text
            correct[i][s] = task.is_correct(text, problems[i].expression)
    return {"correct": correct, "texts": texts, "tokens": tokens, "steps": steps, "committed": committed,
            "seconds": time.perf_counter() - start}


def _accuracy(correct: list[list[bool]]) -> tuple[float, float]:
    avg = sum(sum(c) / len(c) for c in correct) / len(correct)
    anyc = sum(any(c) for c in correct) / len(correct)
    return 100 * avg, 100 * anyc


@torch.inference_mode()
def _time_one(model, tok, prompt: str, max_new_tokens: int, tau, extra: dict | None = None) -> tuple[float, float, int]:
    """(TTFT seconds, total seconds, real tokens) of one greedy batch-1 generation (`extra`: more generate kwargs,
    which may override the defaults, e.g. `eos_token_id=None` for fixed-length timing)."""
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    kwargs = {"do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, **(extra or {})}
    if _is_pipo(model):
        kwargs["pipo_confidence_threshold"] = tau
    t0 = time.perf_counter()
    model.generate(**enc, max_new_tokens=1, **kwargs)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=max_new_tokens, **kwargs)
    total = time.perf_counter() - t0
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    eos = kwargs["eos_token_id"]
    n = new.index(eos) + 1 if eos is not None and eos in new else len(new)
    return ttft, total, sum(1 for t in new[:n] if t != tok.pad_token_id)


def time_side_by_side(entries: dict, tok, problems: list[task.Problem], max_new_tokens: int, reps: int = 2,
                      extra: dict | None = None) -> dict:
    """Batch-1 greedy latency of several (model, τ) entries, interleaved per problem in one process.

    TPOT = (total − TTFT) / (tokens − 1) summed over problems; tokens/s = tokens / total.
    """
    # Warm-up on the longest prompt: a compiled mode compiles here, and the static caches it keeps are then large
    # enough for every timed problem (a longer prompt later would rebuild them and recompile inside the timing).
    longest = max(problems, key=lambda p: len(tok(p.prompt)["input_ids"])).prompt
    for model, tau in entries.values():
        _time_one(model, tok, longest, 8, tau, extra)
        _time_one(model, tok, longest, max_new_tokens, tau, extra)
    acc = {k: {"ttft": [], "decode": 0.0, "decode_tokens": 0, "total": 0.0, "tokens": 0} for k in entries}
    for _ in range(reps):
        for p in tqdm(problems, desc="timing", unit="problem", leave=False):
            for key, (model, tau) in entries.items():
                ttft, total, n = _time_one(model, tok, p.prompt, max_new_tokens, tau, extra)
                a = acc[key]
                a["ttft"].append(ttft)
                a["decode"] += max(0.0, total - ttft)
                a["decode_tokens"] += max(0, n - 1)
                a["total"] += total
                a["tokens"] += n
    result = {}
    for key, a in acc.items():
        result[key] = {
            "ttft_ms": 1000 * statistics.median(a["ttft"]),
            "tpot_ms": 1000 * a["decode"] / max(1, a["decode_tokens"]),
            "tokens_per_s": a["tokens"] / max(1e-9, a["total"]),
        }
    return result


@torch.inference_mode()
def reliability(model, tok, problems: list[task.Problem], batch_size: int = 64) -> dict:
    """Confidence vs draft correctness, teacher-forced on the reference chain of thought (no PAD augmentation):
    a draft is correct when the MTP argmax equals the gold token2. Returns per-draft arrays plus ECE and AUROC."""
    from transformers_pipo.training import PipoDataCollator

    collator = PipoDataCollator(tokenizer=tok, max_pad_ratio=0.0, pad_augmentation="none")
    confs, hits = [], []
    for b in range(0, len(problems), batch_size):
        records = [{"prompt": p.prompt, "response": task.chain_of_thought(p.expression)}
                   for p in problems[b: b + batch_size]]
        batch = collator(records)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        labels = out.pair_labels[:, 3::2]
        valid = labels != IGNORE_INDEX
        pred = out.mtp_logits.argmax(-1)
        confs.append(torch.sigmoid(out.confidence_logits[valid]).float())
        hits.append((pred[valid] == labels[valid]).float())
    conf, hit = torch.cat(confs), torch.cat(hits)
    bins = torch.linspace(0, 1, 11)
    table, ece = [], 0.0
    for lo, hi in zip(bins[:-1], bins[1:]):
        m = (conf >= lo) & ((conf < hi) if hi < 1 else (conf <= hi))
        if m.any():
            c, a, n = conf[m].mean().item(), hit[m].mean().item(), int(m.sum())
            ece += n / len(conf) * abs(c - a)
            table.append({"lo": lo.item(), "hi": hi.item(), "confidence": c, "accuracy": a, "count": n})
    return {"ece": ece, "auroc": _auroc(conf, hit), "bins": table, "n_drafts": len(conf),
            "draft_accuracy": hit.mean().item(), "mean_confidence": conf.mean().item()}


def _auroc(score: torch.Tensor, label: torch.Tensor) -> float:
    pos, neg = int(label.sum()), int((1 - label).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = torch.argsort(score)
    ranks = torch.empty_like(score)
    ranks[order] = torch.arange(1, len(score) + 1, dtype=score.dtype)
    # average ranks of ties
    uniq, inv = torch.unique(score, return_inverse=True)
    sums = torch.zeros(len(uniq)).index_add_(0, inv, ranks)
    counts = torch.zeros(len(uniq)).index_add_(0, inv, torch.ones_like(ranks))
    ranks = (sums / counts)[inv]
    return float((ranks[label > 0].sum() - pos * (pos + 1) / 2) / (pos * neg))


def choose_threshold(sweep: list[dict], min_commit: float = 0.7) -> float:
    """Among τ with commit rate ≥ `min_commit`, the one with the best validation greedy accuracy (ties: higher
    commit rate); if none reaches it, the τ with the highest commit rate among the most accurate half."""
    eligible = [s for s in sweep if s["commit_rate"] >= min_commit and 0 <= s["tau"] < 1]
    if eligible:
        return max(eligible, key=lambda s: (round(s["greedy_accuracy"], 6), s["commit_rate"]))["tau"]
    ranked = sorted((s for s in sweep if 0 <= s["tau"] < 1) or sweep, key=lambda s: -s["greedy_accuracy"])
    top = ranked[: max(1, len(ranked) // 2)]
    return max(top, key=lambda s: s["commit_rate"])["tau"]


def _cached(cfg: PipelineConfig, name: str, compute):
    """Sub-results of the eval stage are cached under eval/ so that an interrupted evaluation resumes."""
    path = cfg.path("eval", f"{name}.json")
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))
    return value


def _row(cfg: PipelineConfig, tok, model, test: list[task.Problem], key: str, label: str, model_name: str,
         mode: str, tau_value) -> dict:
    """One Table-1 row on the test split (cached as eval/row_<key>_tau<τ>.json): avg@4 / pass@4 from
    `eval_samples` samples at temperature 1.0, greedy accuracy, tokens per backbone step, commit rate, and the
    per-problem correctness the report's bootstrap intervals resample."""
    gen = dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)

    def row_fn():
        sampled = generate_stats(model, tok, test, n_samples=cfg.eval_samples, do_sample=True, tau=tau_value,
                                 seed=cfg.seed, desc=f"{key} sampled", **gen)
        greedy = generate_stats(model, tok, test, n_samples=1, do_sample=False, tau=tau_value,
                                desc=f"{key} greedy", **gen)
        avg, pas = _accuracy(sampled["correct"])
        steps = sampled["steps"] + greedy["steps"]
        return {
            "label": label, "model": model_name, "decoding": mode, "tau": tau_value,
            "avg@4": avg, "pass@4": pas, "greedy_accuracy": _accuracy(greedy["correct"])[0],
            "tokens_per_step": (sampled["tokens"] + greedy["tokens"]) / max(1, steps),
            "commit_rate": (commit_rate(sampled["committed"] + greedy["committed"], steps)
                            if mode == "pipo" else None),
            "mean_response_tokens": greedy["tokens"] / len(test),
            "greedy_correct": [c[0] for c in greedy["correct"]],
            "sampled_correct": sampled["correct"],
            "examples": [{"prompt": test[i].prompt, "response": greedy["texts"][i][0],
                          "correct": greedy["correct"][i][0]} for i in range(3)],
        }

    return _cached(cfg, f"row_{key}_tau{tau_value}", row_fn)


def stage_eval_base(cfg: PipelineConfig) -> dict:
    """The Table-1 rows whose τ does not depend on the sweep (student base, teacher, the heads-only MTP row): this
    stage can run as a separate process while PIPO-SFT and OPD train; `eval` then reads them from the cache."""
    tok = load_tokenizer(cfg)
    test = load_split(cfg, "test")[: cfg.n_eval]
    out = {}
    for key, label, model_name, mode, tau in ROWS:
        if tau != "shipped":
            if not cfg.path("models", model_name).exists():  # e.g. a control trained later; `eval` computes it
                print(f"[eval_base] {key}: models/{model_name} not trained yet, left to the eval stage", flush=True)
                continue
            row = _row(cfg, tok, load_model(cfg.path("models", model_name)), test, key, label, model_name, mode, tau)
            out[key] = {m: row[m] for m in ("greedy_accuracy", "avg@4", "pass@4")}
    return out


def stage_eval(cfg: PipelineConfig) -> dict:
    tok = load_tokenizer(cfg)
    test = load_split(cfg, "test")[: cfg.n_eval]
    val = load_split(cfg, "validation")[: cfg.n_sweep]
    timing_problems = load_split(cfg, "validation")[: cfg.n_timing]
    models = {name: load_model(cfg.path("models", name))
              for name in dict.fromkeys(["student_base", "pipo_opd"] + [r[2] for r in ROWS])}
    gen = dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)

    # 1. τ sweep of the final model on the validation split (greedy accuracy, commit rate, batch-1 tokens/s).
    def sweep_fn():
        final = models["pipo_opd"]
        timing = time_side_by_side(
            {"regular": (models["student_base"], None), **{f"tau={tau}": (final, tau) for tau in cfg.thresholds}},
            tok, timing_problems, cfg.max_new_tokens, reps=1)
        base_val = generate_stats(models["student_base"], tok, val, n_samples=1, do_sample=False,
                                  desc="val regular", **gen)
        points = []
        for tau in tqdm(cfg.thresholds, desc="τ sweep"):
            r = generate_stats(final, tok, val, n_samples=1, do_sample=False, tau=tau, desc=f"val τ={tau}", **gen)
            points.append({
                "tau": tau,
                "greedy_accuracy": _accuracy(r["correct"])[0],
                "commit_rate": commit_rate(r["committed"], r["steps"]),
                "tokens_per_step": r["tokens"] / max(1, r["steps"]),
                "tokens_per_s": timing[f"tau={tau}"]["tokens_per_s"],
                "tpot_ms": timing[f"tau={tau}"]["tpot_ms"],
            })
        regular = {"greedy_accuracy": _accuracy(base_val["correct"])[0],
                   "tokens_per_s": timing["regular"]["tokens_per_s"], "tpot_ms": timing["regular"]["tpot_ms"]}
        return {"sweep": points, "regular": regular}

    sweep = _cached(cfg, "sweep", sweep_fn)
    shipped = cfg.shipped_threshold if cfg.shipped_threshold is not None else choose_threshold(sweep["sweep"])

    # 2. Table-1 rows on the test split (the regular rows are usually cached already by `eval_base`).
    rows = {}
    for key, label, model_name, mode, tau in ROWS:
        tau_value = shipped if tau == "shipped" else tau
        rows[key] = _row(cfg, tok, models[model_name], test, key, label, model_name, mode, tau_value)

    # 3. Side-by-side batch-1 latency on the test split (one process, interleaved).
    timing = _cached(cfg, f"timing_tau{shipped}", lambda: time_side_by_side(
        {key: (models[m], shipped if tau == "shipped" else tau) for key, _, m, _, tau in ROWS},
        tok, test[: cfg.n_timing], cfg.max_new_tokens, reps=2))
    base = timing["student_regular"]
    for key in rows:
        t = timing[key]
        rows[key].update(t)
        rows[key]["tpot_ratio"] = base["tpot_ms"] / t["tpot_ms"]
        rows[key]["ttft_ratio"] = base["ttft_ms"] / t["ttft_ms"]

    # 4. Confidence reliability of the final model (and of PIPO-SFT for comparison).
    rel = _cached(cfg, "reliability", lambda: {name: reliability(models[name], tok, test)
                                               for name in ("pipo_sft", "pipo_opd")})

    results = {
        "config": cfg.to_json(), "shipped_threshold": shipped, "rows": rows, "sweep": sweep["sweep"],
        "sweep_regular": sweep["regular"], "reliability": rel, "n_test": len(test), "n_val": len(val),
        "torch_threads": torch.get_num_threads(),
    }
    path = cfg.path("eval", "results.json")
    path.write_text(json.dumps(results, indent=2))
    return {"shipped_threshold": shipped,
            "rows": {k: {m: v[m] for m in ("avg@4", "pass@4", "greedy_accuracy", "commit_rate", "tpot_ratio")}
                     for k, v in rows.items()}}


# ----------------------------------------------------------------------------------------------------------------------
# Speed: TPOT/TTFT of regular vs PIPO decoding per decoding mode (re-runnable on its own)
# ----------------------------------------------------------------------------------------------------------------------


def _static_compiled_kwargs() -> dict:
    """`generate` kwargs of the static-cache + torch.compile path (HF auto-compiles the forward only on accelerators
    unless `compile_config._compile_all_devices` is set; this forces it on CPU too)."""
    from transformers import CompileConfig

    cc = CompileConfig()
    cc._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": cc}


# name -> callable returning the extra `generate` kwargs of that mode; the same kwargs go to the regular and the PIPO
# model, so both sides get the fastest path each has in that mode.
SPEED_MODES = {
    "eager": dict,
    "static_compiled": _static_compiled_kwargs,
}


def measure_speed(models: dict, tok, problems: list[task.Problem], modes, tau: float, max_new_tokens: int,
                  reps: int = 2) -> dict:
    """Side-by-side batch-1 greedy latency of the student base (regular decoding) and the PIPO student at τ, for each
    decoding mode in `modes` (keys of `SPEED_MODES`), in one process, interleaved per problem. A mode a model does
    not support is recorded with its error instead of aborting the other modes."""
    out = {}
    for mode in modes:
        if mode not in SPEED_MODES:
            raise ValueError(f"unknown speed mode {mode!r}; choose from {sorted(SPEED_MODES)}")
        extra = SPEED_MODES[mode]()
        entries = {"regular": (models["student_base"], None), f"pipo_tau{tau}": (models["pipo_opd"], tau),
                   "pipo_tau1.0": (models["pipo_opd"], 1.0)}
        try:
            timing = time_side_by_side(entries, tok, problems, max_new_tokens, reps=reps, extra=extra)
        except Exception as err:  # noqa: BLE001  (recorded in the report; the other modes still run)
            out[mode] = {"error": f"{type(err).__name__}: {err}"[:300]}
            continue
        base = timing["regular"]
        for key, t in timing.items():
            t["tpot_ratio"] = base["tpot_ms"] / t["tpot_ms"]
            t["ttft_ratio"] = base["ttft_ms"] / t["ttft_ms"]
        out[mode] = {"tau": tau, "n_problems": len(problems), "reps": reps, "timing": timing,
                     "tpot_ratio": timing[f"pipo_tau{tau}"]["tpot_ratio"]}
    return out


def stage_speed(cfg: PipelineConfig) -> dict:
    """TPOT ratio of PIPO-SFT+OPD at the shipped τ vs regular decoding of the student base, per mode in
    `cfg.speed_modes`. Each mode is cached under eval/speed_<mode>.json, so adding a mode later and re-running
    `--stages speed,report --force` measures only the new one."""
    results = json.loads(cfg.path("eval", "results.json").read_text())
    tau = results["shipped_threshold"]
    tok = load_tokenizer(cfg)
    models = {name: load_model(cfg.path("models", name)) for name in ("student_base", "pipo_opd")}
    problems = load_split(cfg, "test")[: cfg.n_timing]
    speed = {}
    for mode in cfg.speed_modes:
        speed[mode] = _cached(cfg, f"speed_{mode}_tau{tau}", lambda mode=mode: measure_speed(
            models, tok, problems, [mode], tau, cfg.max_new_tokens, reps=cfg.speed_reps)[mode])
    cfg.path("eval", "speed.json").write_text(json.dumps(speed, indent=2))
    return {mode: v.get("tpot_ratio", v.get("error")) for mode, v in speed.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def _fmt(value, spec=".1f", none="–"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def bootstrap_interval(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-problem `values` (resampling problems with replacement)."""
    import random

    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int((1 - level) / 2 * n_boot)]
    hi = means[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return lo, hi


def per_problem(row: dict, metric: str) -> list[float]:
    """Per-problem score (0/1 or a fraction) of `metric` in {greedy, avg@4, pass@4}, in percent."""
    if metric == "greedy":
        return [100.0 * c for c in row["greedy_correct"]]
    if metric == "avg@4":
        return [100.0 * sum(c) / len(c) for c in row["sampled_correct"]]
    if metric == "pass@4":
        return [100.0 * any(c) for c in row["sampled_correct"]]
    raise ValueError(f"unknown metric {metric!r}")


def intervals(results: dict) -> dict:
    """95% bootstrap intervals of every row's accuracies and of the paired differences of the PIPO rows against the
    student base (and PIPO-SFT+OPD against the budget-matched base when that row exists), resampling the same
    problems for both sides."""
    rows = results["rows"]
    out = {"rows": {}, "paired": {}}
    for key, row in rows.items():
        out["rows"][key] = {m: bootstrap_interval(per_problem(row, m)) for m in ("greedy", "avg@4", "pass@4")}
    pairs = [(key, "student_regular") for key in ("pipo_sft_opd", "pipo_sft", "mtp_unverified")]
    if "student_matched" in rows:
        pairs.append(("pipo_sft_opd", "student_matched"))
    for key, ref in pairs:
        name = key if ref == "student_regular" else f"{key}_vs_{ref}"
        d = out["paired"][name] = {
            "label": f"{rows[key]['label']} − {'student base' if ref == 'student_regular' else 'budget-matched base'}"}
        for m in ("greedy", "avg@4", "pass@4"):
            diff = [a - b for a, b in zip(per_problem(rows[key], m), per_problem(rows[ref], m))]
            d[m] = {"mean": sum(diff) / len(diff), "ci": bootstrap_interval(diff)}
    return out


def targets(results: dict) -> list[tuple[str, bool, str]]:
    """The issue's targets on the test split, each as (name, met, value)."""
    rows = results["rows"]
    reg, opd, teacher = rows["student_regular"], rows["pipo_sft_opd"], rows["teacher"]
    rel = results["reliability"]["pipo_opd"]
    speed = results.get("speed", {})
    out = [
        ("teacher greedy ≥ 85%", teacher["greedy_accuracy"] >= 85, f"{teacher['greedy_accuracy']:.1f}"),
        ("student base greedy ≥ 50%", reg["greedy_accuracy"] >= 50, f"{reg['greedy_accuracy']:.1f}"),
        ("teacher clearly better than the student base (greedy)",
         teacher["greedy_accuracy"] >= reg["greedy_accuracy"] + 5,
         f"{teacher['greedy_accuracy']:.1f} vs {reg['greedy_accuracy']:.1f}"),
        ("PIPO-SFT+OPD greedy ≥ student base − 2", opd["greedy_accuracy"] >= reg["greedy_accuracy"] - 2,
         f"{opd['greedy_accuracy']:.1f} vs {reg['greedy_accuracy']:.1f} − 2"),
        ("PIPO-SFT+OPD avg@4 ≥ student base avg@4 − 2", opd["avg@4"] >= reg["avg@4"] - 2,
         f"{opd['avg@4']:.1f} vs {reg['avg@4']:.1f} − 2"),
        ("PIPO-SFT+OPD pass@4 ≥ student base pass@4 + 3", opd["pass@4"] >= reg["pass@4"] + 3,
         f"{opd['pass@4']:.1f} vs {reg['pass@4']:.1f} + 3"),
        ("commit rate ≥ 70% at the shipped τ", (opd["commit_rate"] or 0) >= 0.7,
         f"{100 * (opd['commit_rate'] or 0):.1f}% at τ = {results['shipped_threshold']}"),
        ("confidence ECE ≤ 0.05", rel["ece"] <= 0.05, f"{rel['ece']:.3f}"),
        ("confidence AUROC ≥ 0.85", rel["auroc"] >= 0.85, f"{rel['auroc']:.3f}"),
    ]
    for mode, v in speed.items():
        if "error" in v:
            out.append((f"TPOT ratio ≥ 1.5× ({mode})", False, f"not measured: {v['error']}"))
        else:
            out.append((f"TPOT ratio ≥ 1.5× ({mode})", v["tpot_ratio"] >= 1.5, f"{v['tpot_ratio']:.2f}×"))
    return out


def _plots(results: dict, docs: Path) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [s["tokens_per_s"] for s in sweep]
    ys = [s["greedy_accuracy"] for s in sweep]
    ax.plot(xs, ys, "o-", label="PIPO-SFT+OPD, τ sweep")
    for s in sweep:
        ax.annotate(f"τ={s['tau']:g}", (s["tokens_per_s"], s["greedy_accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    reg = results["sweep_regular"]
    ax.plot([reg["tokens_per_s"]], [reg["greedy_accuracy"]], "s", color="black", label="student base, regular")
    ax.set_xlabel("tokens/s (batch 1, greedy, CPU)")
    ax.set_ylabel("validation greedy accuracy (%)")
    ax.set_title("Accuracy vs speed across the confidence threshold τ")
    ax.legend(fontsize=8)
    fig.tight_layout()
    pareto = docs / "arithmetic_pareto.png"
    fig.savefig(pareto, dpi=110)
    plt.close(fig)

    rel = results["reliability"]["pipo_opd"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
    conf = [b["confidence"] for b in rel["bins"]]
    acc = [b["accuracy"] for b in rel["bins"]]
    ax.bar([(b["lo"] + b["hi"]) / 2 for b in rel["bins"]], acc, width=0.09, alpha=0.6, label="draft accuracy")
    ax.plot(conf, acc, "o-", color="C3", label="mean confidence → accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence c")
    ax.set_ylabel("fraction of drafts equal to the gold token")
    ax.set_title(f"PIPO-SFT+OPD confidence: ECE {rel['ece']:.3f}, AUROC {rel['auroc']:.3f}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    diagram = docs / "arithmetic_reliability.png"
    fig.savefig(diagram, dpi=110)
    plt.close(fig)
    return pareto.name, diagram.name


def _ci(value: float, ci) -> str:
    return f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"


def stage_report(cfg: PipelineConfig) -> dict:
    results = json.loads(cfg.path("eval", "results.json").read_text())
    speed_file = cfg.path("eval", "speed.json")
    results["speed"] = json.loads(speed_file.read_text()) if speed_file.exists() else {}
    docs = Path(cfg.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    pareto, diagram = _plots(results, docs)
    info = {s: read_marker(cfg, s) for s in ("train_teacher", "train_student", "sample_teacher", "sft", "opd")}
    more = read_marker(cfg, "train_teacher_more") if is_done(cfg, "train_teacher_more") else {"steps": 0, "seconds": 0}
    sft_more = read_marker(cfg, "sft_more") if is_done(cfg, "sft_more") else None
    rows = results["rows"]
    ci = intervals(results)
    lines = [
        "# Miniature PIPO reproduction: integer arithmetic",
        "",
        "Generated by `python -m examples.arithmetic.run_pipeline --out " + cfg.out + "` (stage `report`); do not edit"
        " by hand. Everything was trained from scratch on this machine's CPU (torch threads: "
        f"{results['torch_threads']}).",
        "",
        "Task: `Q: <expression>\\nA:` where `<expression>` has 2 or 3 integer operands in [0, 999] joined by `+` or "
        "`-` (no spaces, evaluated left to right; the value may be negative). The response is a chain of thought "
        "(one fixed-width line per operation, digit columns least-significant first with explicit carries/borrows; "
        "see `examples/arithmetic/task.py`) ending in `#### <value>`. Scoring: `transformers_pipo.demo.is_correct`, "
        f"the same function `pipo demo` uses. Test split: {results['n_test']} problems (never seen in training); τ "
        f"chosen on {results['n_val']} validation problems. Shipped threshold **τ = {results['shipped_threshold']}**.",
        "",
        "## Table 1 analogue (test split)",
        "",
        "Accuracies in %, each with its 95% bootstrap interval over test problems (2,000 resamples). avg@4 / pass@4: 4"
        " samples at temperature 1.0 (no top-k/top-p). Greedy: one greedy decode. Tokens/step: real tokens per "
        "backbone step (prefill counted as a step). Commit rate: committed drafts / backbone steps.",
        "",
        "| row | τ | greedy acc | avg@4 | pass@4 | tokens/step | commit rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        c = ci["rows"][key]
        lines.append(
            f"| {row['label']} | {_fmt(row['tau'], 'g')} | {_ci(row['greedy_accuracy'], c['greedy'])} | "
            f"{_ci(row['avg@4'], c['avg@4'])} | {_ci(row['pass@4'], c['pass@4'])} | {row['tokens_per_step']:.2f} | "
            f"{_fmt(None if row['commit_rate'] is None else 100 * row['commit_rate'])}"
            f"{'' if row['commit_rate'] is None else '%'} |"
        )
    lines += [
        "",
        "### Paired differences (same test problems, points, 95% bootstrap interval)",
        "",
        "The student base is the model PIPO was converted from. PIPO-SFT then trains it much further (on "
        "reference chains of thought), so the budget-matched control row continues the same base as an ordinary "
        "causal LM on the same records, batch size, steps and learning-rate schedule: the difference against it "
        "isolates the pair format from the extra training.",
        "",
        "| difference | greedy | avg@4 | pass@4 |",
        "|---|---|---|---|",
    ]
    for d in ci["paired"].values():
        lines.append(f"| {d['label']} | " + " | ".join(
            f"{d[m]['mean']:+.1f} [{d[m]['ci'][0]:+.1f}, {d[m]['ci'][1]:+.1f}]" for m in ("greedy", "avg@4", "pass@4"))
            + " |")
    lines += [
        "",
        "## Speed (batch 1, greedy, CPU, one process, interleaved per problem)",
        "",
        "TPOT = decode time per generated token after the first; ratio = student-base regular TPOT / row TPOT (> 1 "
        "is faster). Each decoding mode gives both sides the same path (`eager`: dynamic cache, no compile; "
        "`static_compiled`: static cache + torch.compile). Re-run one mode with `--stages speed,report --force "
        "--set 'speed_modes=[...]'`.",
    ]
    sizes = sorted({(v["n_problems"], v["reps"]) for v in results["speed"].values() if "n_problems" in v})
    if sizes:
        lines += ["", "Each mode: " + ", ".join(f"{n} test problems × {r} interleaved passes" for n, r in sizes)
                  + "; both sides are timed under `torch.inference_mode()`, as `_time_one` calls them."]
    lines += [
        "",
        "| mode | row | TPOT ms | TPOT ratio | TTFT ms | TTFT ratio | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, v in results["speed"].items():
        if "error" in v:
            lines.append(f"| {mode} | not measured: {v['error']} | | | | | |")
            continue
        for key, t in v["timing"].items():
            lines.append(f"| {mode} | {key} | {t['tpot_ms']:.2f} | {t['tpot_ratio']:.2f}× | {t['ttft_ms']:.2f} | "
                         f"{t['ttft_ratio']:.2f}× | {t['tokens_per_s']:.1f} |")
    lines += ["", "Eager TPOT of every Table-1 row (same conditions, measured in the `eval` stage):", "",
              "| row | TPOT ms | TPOT ratio | TTFT ms | TTFT ratio |", "|---|---|---|---|---|"]
    for key, row in rows.items():
        lines.append(f"| {row['label']} | {row['tpot_ms']:.2f} | {row['tpot_ratio']:.2f}× | {row['ttft_ms']:.2f} | "
                     f"{row['ttft_ratio']:.2f}× |")
    lines += ["", "## Targets", "", "| target | met | value |", "|---|---|---|"]
    for name, ok, value in targets(results):
        lines.append(f"| {name} | {'yes' if ok else '**no**'} | {value} |")
    lines += [
        "",
        "## τ sweep (validation, PIPO-SFT+OPD, greedy)",
        "",
        f"![accuracy vs tokens/s]({pareto})",
        "",
        "| τ | greedy acc | commit rate | tokens/step | tokens/s (batch 1) | TPOT ms |",
        "|---|---|---|---|---|---|",
    ]
    for s in results["sweep"]:
        lines.append(f"| {s['tau']:g} | {s['greedy_accuracy']:.2f} | {100 * s['commit_rate']:.1f}% | "
                     f"{s['tokens_per_step']:.2f} | {s['tokens_per_s']:.1f} | {s['tpot_ms']:.2f} |")
    reg = results["sweep_regular"]
    lines += [f"| student base, regular | {reg['greedy_accuracy']:.2f} | – | 1.00 | {reg['tokens_per_s']:.1f} | "
              f"{reg['tpot_ms']:.2f} |", ""]
    lines += [
        "## Confidence head reliability (test split, teacher-forced on the reference chain of thought)",
        "",
        "A draft counts as correct when the MTP head's argmax equals the gold second token of the pair.",
        "",
        f"![reliability diagram]({diagram})",
        "",
        "| model | drafts | draft accuracy | mean confidence | ECE | AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["reliability"].items():
        lines.append(f"| {name} | {r['n_drafts']} | {r['draft_accuracy']:.3f} | {r['mean_confidence']:.3f} | "
                     f"{r['ece']:.3f} | {r['auroc']:.3f} |")
    t, s, st = info["train_teacher"], info["train_student"], info["sample_teacher"]
    c = results["config"]
    more_sft = c.get("sft_more_steps") or ()
    more_sft = (more_sft,) if isinstance(more_sft, int) else tuple(more_sft)
    lines += [
        "",
        "## How the models were made",
        "",
        f"- Teacher: Qwen3-style, hidden {c['teacher']['hidden_size']}, {c['teacher']['num_hidden_layers']} layers,"
        f" {t['params'] / 1e6:.2f}M parameters, "
        + ("the student base below trained further for " if c.get("teacher_init") == "student_base" else "")
        + f"{t['steps']} + {more['steps']} (continued run) steps × {c['base_batch_size']} sequences of the reference "
        f"chain of thought on problems the student base never saw ({(t['seconds'] + more['seconds']) / 60:.1f} min).",
        f"- Student base: Qwen3-style, hidden {c['student']['hidden_size']}, {c['student']['num_hidden_layers']} "
        f"layers, {s['params'] / 1e6:.2f}M parameters, {s['steps']} steps × {c['base_batch_size']} on other "
        f"train problems ({s['seconds'] / 60:.1f} min; trained at the same time as the teacher, as a second "
        "process).",
        (f"- PIPO SFT data: the reference chain of thought of {st['reference_top_up']} train prompts (disjoint from "
         "both base models' problems and the OPD prompts): a correct teacher sample of this deterministic format is "
         f"the same text; mean {st['mean_response_tokens']:.1f} tokens." if st.get("sft_data") == "reference" else
         f"- Teacher trajectories: {st['sampled']} samples at temperature 1.0 on train prompts, {st['kept']} correct "
         f"kept ({100 * st['teacher_sample_accuracy']:.1f}%), mean {st['mean_response_tokens']:.1f} tokens."),
        f"- Conversion: `PipoForCausalLM.from_backbone(student_base, tokenizer=tok)` ({c.get('compressor_type', 'mlp')} "
        "compressor, MTP layer "
        "copied from the last backbone layer, the tokenizer's dedicated `<pad>` is the PIPO PAD).",
        f"- MTP row: `PipoSFTTrainer(train_mode='heads')`, {c['mtp_only_steps']} steps: only compressor, MTP head "
        "and confidence head train, the backbone is the token-level student; decoded with τ < 0 (every draft "
        "committed, no verification) — the closest analogue here of the paper's unverified native-MTP row.",
        f"- PIPO-SFT: `PipoSFTTrainer(train_mode='full')`, {c['sft_steps']} steps"
        + (" + continued runs of " + " + ".join(str(n) for n in more_sft) + f" steps (lr {c['sft_more_lr']:g}, each"
           " with its own warm-up and cosine schedule)" if any(more_sft) else "")
        + f" × {c['sft_batch_size']}, PAD augmentation `split` with r ~ U[0, 0.25] "
        f"({(info['sft']['seconds'] + (sft_more or {}).get('seconds', 0)) / 60:.1f} min).",
        f"- PIPO-SFT+OPD: `PipoOPDTrainer`, {c['opd_steps']} steps × {c['opd_batch_size']} on-policy PIPO rollouts "
        f"(τ = {c['opd_threshold']} during rollouts), full reverse KL to the teacher, confidence target "
        f"1 − TV ({info['opd']['seconds'] / 60:.1f} min).",
        "",
    ]
    notes = Path(cfg.notes_file)
    if notes.exists():
        lines += ["## Notes", "", notes.read_text().strip(), ""]
    (docs / "RESULTS.md").write_text("\n".join(lines))
    return {"results": str(docs / "RESULTS.md"), "targets": [(n, ok, v) for n, ok, v in targets(results)]}


# ----------------------------------------------------------------------------------------------------------------------
# Export of the embedded demo models
# ----------------------------------------------------------------------------------------------------------------------


def stage_export(cfg: PipelineConfig) -> dict:
    """Copy the final PIPO student (τ = the shipped threshold in its generation_config) and the student base, each
    with the tokenizer, into the package (`transformers_pipo/assets/arithmetic/`)."""
    results = json.loads(cfg.path("eval", "results.json").read_text())
    tau = results["shipped_threshold"]
    dest = Path(cfg.assets_dir)
    tok = load_tokenizer(cfg)
    sizes = {}
    for name, src in (("pipo_student", "pipo_opd"), ("student_base", "student_base")):
        target = dest / name
        if target.exists():
            shutil.rmtree(target)
        model = load_model(cfg.path("models", src))
        if name == "pipo_student":
            model.generation_config.pipo_confidence_threshold = tau
        model.generation_config.max_new_tokens = cfg.max_new_tokens
        save_embedded_model(model, target, tok)  # package data: no remote-code copies (the package holds the code)
        sizes[name] = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    write_jsonl(dest / "test_problems.jsonl",
                ({"expression": p.expression, "answer": p.answer} for p in load_split(cfg, "test")))
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    if total > 25 * 2**20:
        raise RuntimeError(f"embedded models take {total / 2**20:.1f} MB > 25 MB")
    (dest / "README.md").write_text(
        "Embedded demo models of the arithmetic reproduction (examples/arithmetic), written by its `export` stage.\n\n"
        f"- `pipo_student/`: the PIPO-SFT+OPD student, generation_config τ = {tau}.\n"
        "- `student_base/`: the ordinary causal LM it was converted from (regular-decoding baseline).\n"
        "- `test_problems.jsonl`: the held-out test split (never trained on); `pipo demo` draws fresh problems of "
        "the same family instead.\n\n"
        "They hold config, weights and tokenizer, no code: with `transformers_pipo` imported both load with "
        "`AutoModelForCausalLM.from_pretrained(path)` (`trust_remote_code` optional); see docs/RESULTS.md.\n"
    )
    return {"bytes": sizes, "total_mb": total / 2**20, "threshold": tau}
