"""Miniature PIPO reproduction on integer arithmetic, stage by stage and resumable.

    python -m examples.arithmetic.run_pipeline --out outputs/arithmetic            # everything (about an hour, 2 CPU)
    python -m examples.arithmetic.run_pipeline --stages eval,report                # only some stages
    python -m examples.arithmetic.run_pipeline --quick --out outputs/arith-quick   # minutes-long smoke run

Each stage writes its artifacts under --out and a marker `markers/<stage>.done.json`; a stage whose marker exists
is skipped (use --force to redo the named stages). Run from the repository root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from .common import PipelineConfig, is_done, mark_done, quick_config, read_marker, set_threads

STAGE_ORDER = [
    "data", "tokenizer", "train_student", "train_student_more", "train_teacher", "train_teacher_more", "sample_teacher",
    "train_student_matched", "convert", "sft_mtp_only", "eval_base", "sft", "sft_more", "opd", "eval", "speed", "report", "export",
]


def _stage_function(name: str):
    if name in ("data", "tokenizer", "train_teacher", "train_teacher_more", "train_student", "sample_teacher",
                "train_student_more", "train_student_matched"):
        from . import stages_base as module
    elif name in ("convert", "sft_mtp_only", "sft", "sft_more", "opd"):
        from . import stages_pipo as module
    else:
        from . import stages_eval as module
    return getattr(module, f"stage_{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/arithmetic", help="Output directory (ignored by git).")
    parser.add_argument("--stages", default="all", help=f"Comma-separated subset of {','.join(STAGE_ORDER)}.")
    parser.add_argument("--force", action="store_true", help="Redo the named stages even if their marker exists.")
    parser.add_argument("--quick", action="store_true", help="Toy sizes for a smoke test (numbers meaningless).")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core box).")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="Override a PipelineConfig field (JSON value), e.g. --set teacher_steps=2000.")
    return parser


def make_config(args) -> PipelineConfig:
    cfg = quick_config(args.out) if args.quick else PipelineConfig(out=args.out)
    cfg.threads = args.threads
    for item in args.set:
        key, _, value = item.partition("=")
        if not hasattr(cfg, key):
            raise SystemExit(f"unknown PipelineConfig field {key!r}")
        current = getattr(cfg, key)
        parsed = json.loads(value)
        if dataclasses.is_dataclass(current):
            parsed = type(current)(**parsed)
        elif isinstance(current, tuple):
            parsed = tuple(parsed)
        setattr(cfg, key, parsed)
    return cfg


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = make_config(args)
    set_threads(cfg.threads)
    stages = STAGE_ORDER if args.stages == "all" else [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; choose from {STAGE_ORDER}")
    cfg.root.mkdir(parents=True, exist_ok=True)
    (cfg.root / "pipeline_config.json").write_text(json.dumps(cfg.to_json(), indent=2))
    for name in STAGE_ORDER:
        if name not in stages:
            continue
        if is_done(cfg, name) and not args.force:
            print(f"[pipeline] {name}: done already ({read_marker(cfg, name)['finished']}), skipped", flush=True)
            continue
        print(f"[pipeline] {name}: start", flush=True)
        start = time.time()
        info = _stage_function(name)(cfg) or {}
        info["stage_seconds"] = round(time.time() - start, 1)
        mark_done(cfg, name, info)
        summary = {k: v for k, v in info.items() if k != "log"}
        print(f"[pipeline] {name}: done in {info['stage_seconds']}s {json.dumps(summary, default=str)[:400]}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
