"""Eager batch-1 TPOT ratio of PIPO vs regular decoding as a function of backbone depth, side by side in one process.

For each depth, a random Qwen3 backbone with the embedded arithmetic student's width, heads and vocabulary is decoded
regularly (transformers' `generate`, dynamic cache) and as a freshly converted PIPO model (`from_backbone`, the
same compressor as the demo) at τ<0, on the demo's held-out prompts, interleaved per prompt. EOS is off, so both
sides emit exactly `--new-tokens` tokens; timed by the arithmetic `speed` stage's own function (`time_side_by_side`:
TPOT = (total − TTFT) / (tokens − 1), under `torch.inference_mode()`).

Eager decoding of a model this small is bound by per-op overhead: a PIPO step carries a fixed set of extra ops
(compressor, MTP extras, confidence head, second LM head) besides its MTP decoder layer, so the ratio grows with
depth. Random weights commit every draft (τ<0); a trained student at its shipped τ commits slightly fewer and sits
somewhat below its random-weight figure (docs/RESULTS.md). The figure is the ratio; absolute times are noise.

    python benchmarks/bench_eager_depth.py --layers 4 6 8
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm.auto import tqdm

from examples.arithmetic.stages_eval import time_side_by_side
from examples.arithmetic.task import Problem


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 6, 8], help="backbone depths to compare")
    p.add_argument("--problems", type=int, default=12, help="demo prompts timed per pass")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3, help="interleaved passes over the prompts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def _models(template, tok, layers: int):
    """A random regular model of `layers` layers with the template's other sizes, and its PIPO conversion."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from transformers_pipo import PipoForCausalLM

    fields = {**template.config.to_dict(), "num_hidden_layers": layers, "use_cache": True}
    if fields.get("layer_types") is not None:
        fields["layer_types"] = [fields["layer_types"][0]] * layers
    config = AutoConfig.for_model(**fields)
    attn = template.config._attn_implementation
    torch.manual_seed(0)
    regular = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    backbone = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    pipo = PipoForCausalLM.from_backbone(backbone, tokenizer=tok, compressor_type="mlp").eval()
    return regular, pipo


def measure(layers: int, template, tok, problems, new_tokens: int, reps: int) -> dict:
    """Regular vs PIPO (τ<0) TPOT of a random backbone of `layers` layers, timed as the arithmetic `speed` stage
    times (`time_side_by_side`), with EOS off so every generation emits `new_tokens` tokens."""
    regular, pipo = _models(template, tok, layers)
    timing = time_side_by_side({"regular": (regular, None), "pipo": (pipo, -1.0)}, tok, problems, new_tokens,
                               reps=reps, extra={"eos_token_id": None})
    tpot = {key: t["tpot_ms"] for key, t in timing.items()}
    return {"layers": layers, "regular_tpot_ms": tpot["regular"], "pipo_tpot_ms": tpot["pipo"],
            "tpot_ratio": tpot["regular"] / tpot["pipo"]}


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers_pipo import demo

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(demo.BASE_MODEL_DIR)
    template = AutoModelForCausalLM.from_pretrained(demo.BASE_MODEL_DIR)
    problems = [Problem(e, demo.evaluate(e)) for e in demo.held_out_problems()[: args.problems]]
    rows = [measure(n, template, tok, problems, args.new_tokens, args.reps) for n in tqdm(args.layers, unit="depth")]
    print(f"random Qwen3 backbones ({template.config.hidden_size} wide), batch 1 greedy, PIPO tau<0, "
          f"{args.problems} prompts x {args.reps} passes, {args.new_tokens} new tokens, eager, dynamic cache")
    print(f"{'layers':>6}  {'regular TPOT ms':>15}  {'PIPO TPOT ms':>12}  {'ratio':>6}")
    for r in rows:
        print(f"{r['layers']:>6}  {r['regular_tpot_ms']:>15.3f}  {r['pipo_tpot_ms']:>12.3f}  {r['tpot_ratio']:>5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
