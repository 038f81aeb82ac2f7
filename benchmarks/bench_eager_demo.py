"""Batch-1 greedy TPOT of the embedded arithmetic pair: regular `generate` on the base model vs PIPO at τ<0, the
shipped τ and τ=1, side by side in one process, interleaved per problem (the arithmetic `speed` stage's measurement:
`examples.arithmetic.stages_eval.time_side_by_side`, same 12 held-out problems and 96 new tokens by default).

The figure is the ratio regular TPOT / PIPO TPOT; absolute times on a shared CPU are noise. The regular side is
transformers' own `generate`, untouched. `--modes eager static_compiled` adds the static-cache + torch.compile rows
(`SPEED_MODES`); `--profile N` prints a cProfile of N eager generations per side instead of timing.

    python benchmarks/bench_eager_demo.py --reps 3
    python benchmarks/bench_eager_demo.py --modes eager static_compiled
    python benchmarks/bench_eager_demo.py --profile 12
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats

import torch

from examples.arithmetic.stages_eval import SPEED_MODES, _time_one, time_side_by_side
from examples.arithmetic.task import Problem
from transformers_pipo import demo


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=12, help="held-out problems timed (the speed stage uses 12)")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--reps", type=int, default=2, help="interleaved passes over the problems")
    p.add_argument("--modes", nargs="+", default=["eager"], choices=sorted(SPEED_MODES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="instead of timing: cProfile N eager generations of each side and print the top functions")
    p.add_argument("--top", type=int, default=25, help="rows of each profile")
    p.add_argument("--sort", default="cumulative", choices=["cumulative", "tottime"], help="profile order")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def _problems(n: int) -> list[Problem]:
    return [Problem(e, demo.evaluate(e)) for e in demo.held_out_problems()[:n]]


def profile(pipo, base, tok, problems, tau: float, n: int, new_tokens: int, top: int, sort: str) -> None:
    """cProfile of `n` generations of regular decoding and of PIPO at τ, each printed in `sort` order."""
    for label, model, t in (("regular", base, None), (f"pipo tau={tau}", pipo, tau)):
        _time_one(model, tok, problems[0].prompt, new_tokens, t)  # warm-up
        prof = cProfile.Profile()
        prof.enable()
        for i in range(n):
            _time_one(model, tok, problems[i % len(problems)].prompt, new_tokens, t)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(sort).print_stats(top)
        print(f"===== {label}: {n} generations =====")
        print(out.getvalue())


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipo, base, tok = demo.load_models()
    tau = float(pipo.generation_config.pipo_confidence_threshold)
    problems = _problems(args.problems)
    if args.profile:
        profile(pipo, base, tok, problems, tau, args.profile, args.new_tokens, args.top, args.sort)
        return 0
    taus = [-1.0, tau, 1.0]
    entries = {"regular": (base, None), **{f"pipo tau={t:g}": (pipo, t) for t in taus}}
    results = {}
    for mode in args.modes:
        timing = time_side_by_side(entries, tok, problems, args.new_tokens, reps=args.reps, extra=SPEED_MODES[mode]())
        base_tpot = timing["regular"]["tpot_ms"]
        for t in timing.values():
            t["tpot_ratio"] = base_tpot / t["tpot_ms"]
        results[mode] = timing
    print(f"\nembedded arithmetic pair, batch 1 greedy, {len(problems)} problems x {args.reps} reps, "
          f"{args.new_tokens} new tokens, shipped tau={tau:g}")
    print(f"{'mode':<16}{'row':<18}{'TPOT ms':>9}{'TPOT ratio':>12}{'TTFT ms':>9}")
    for mode, timing in results.items():
        for key, t in timing.items():
            print(f"{mode:<16}{key:<18}{t['tpot_ms']:>9.3f}{t['tpot_ratio']:>11.2f}x{t['ttft_ms']:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tau": tau, "args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
