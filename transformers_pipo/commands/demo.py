"""`pipo demo`: solve fresh arithmetic problems with the embedded PIPO student and with regular decoding of its base
model, side by side (answers, correctness, commit rate, tokens/s, speedup). Works offline from the packaged models."""

from __future__ import annotations

import argparse
import json
import sys

from ._fast_path import add_fast_path_argument, apply_fast_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Solve fresh arithmetic problems with the embedded PIPO model vs regular decoding, side by side.",
        description=__doc__,
    )
    parser.add_argument("--n", type=int, default=8, help="Number of fresh problems (default 8).")
    parser.add_argument("--pipo-confidence-threshold", type=float, default=None,
                        help="Confidence threshold τ (<0 commits every draft, >=1 none); default: the shipped τ.")
    parser.add_argument("--seed", type=int, default=None, help="Seed of the problem draw (default: random).")
    parser.add_argument("--json", action="store_true", help="Print a machine-readable JSON report.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--pipo-model", default=None, help="PIPO model folder (default: the embedded one).")
    parser.add_argument("--base-model", default=None, help="Baseline model folder (default: the embedded one).")
    add_fast_path_argument(parser)
    parser.set_defaults(func=run)


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def run(args: argparse.Namespace) -> int:
    if args.n <= 0:
        raise SystemExit("pipo demo: --n must be positive.")
    import torch
    from tqdm.auto import tqdm

    from transformers_pipo import demo

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        models = demo.load_models(args.pipo_model, args.base_model)
    except FileNotFoundError as err:
        print(f"pipo demo: {err}", file=sys.stderr)
        return 1
    fast_path = apply_fast_path(models[:2], args.fast_path)  # the same path for PIPO and the regular baseline

    def progress(items):
        return tqdm(items, desc="solving", unit="problem", file=sys.stderr, disable=None)

    report = demo.compare(args.n, pipo_confidence_threshold=args.pipo_confidence_threshold, seed=args.seed, models=models, progress=progress)
    if args.json:
        print(json.dumps(demo.as_json(report), indent=2))
        return 0
    s = report["summary"]
    width = max(len(r["pipo"].expression) for r in report["problems"]) + 2
    print(f"PIPO student (τ = {report['threshold']}) vs its base model with regular decoding, greedy, batch 1, "
          f"{fast_path} decoding path\n")
    print(f"{'problem':<{width}} {'expected':>10}   {'PIPO':>10}     {'regular':>10}")
    for r in report["problems"]:
        p, b = r["pipo"], r["regular"]
        print(f"{p.expression:<{width}} {p.expected:>10}   {str(p.answer):>10} {_mark(p.correct)}   "
              f"{str(b.answer):>10} {_mark(b.correct)}")
    first = report["problems"][0]["pipo"]
    print(f"\nPIPO's chain of thought for {first.expression}:\n{first.response.strip()}\n")
    print(f"accuracy      PIPO {s['pipo_accuracy']:.0%}   regular {s['regular_accuracy']:.0%}")
    print(f"commit rate   {s['commit_rate']:.1%} of backbone steps emitted a second token "
          f"({s['tokens_per_backbone_step']:.2f} tokens per backbone step)")
    print(f"tokens/s      PIPO {s['pipo_tokens_per_s']:.1f}   regular {s['regular_tokens_per_s']:.1f}   "
          f"speedup {s['speedup']:.2f}x")
    return 0
