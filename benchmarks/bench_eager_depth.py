"""Eager batch-1 TPOT ratio of PIPO vs regular decoding as a function of backbone depth, side by side in one process.

For each depth, a random Qwen3 backbone with the embedded arithmetic student's width, heads and vocabulary is decoded
regularly (transformers' `generate`, dynamic cache) and as a freshly converted PIPO model (`from_backbone`, the
same compressor as the demo) at τ<0, on the demo's held-out prompts, interleaved per prompt. EOS is off, so both
sides emit exactly `--new-tokens` tokens; TPOT = (total − TTFT) / (tokens − 1), as in the arithmetic `speed` stage.

Eager decoding of a model this small is bound by per-op overhead: a PIPO step carries a fixed set of extra ops
(compressor, MTP extras, confidence head, second LM head) besides its MTP decoder layer, so the ratio grows with
depth. Random weights commit every draft (τ<0); a trained student at its shipped τ commits slightly fewer and sits
somewhat below its random-weight figure (docs/RESULTS.md). The figure is the ratio; absolute times are noise.

    python benchmarks/bench_eager_depth.py --layers 4 6 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm.auto import tqdm


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


def _decode_seconds(model, enc, new_tokens: int, pad: int, extra: dict) -> float:
    """Decode time after the first token: one full generation minus a one-token one."""
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=pad, **extra)
    start = time.perf_counter()
    model.generate(**enc, max_new_tokens=1, **kwargs)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(**enc, max_new_tokens=new_tokens, **kwargs)
    return time.perf_counter() - start - ttft


@torch.inference_mode()
def measure(layers: int, template, tok, prompts: list[str], new_tokens: int, reps: int) -> dict:
    regular, pipo = _models(template, tok, layers)
    sides = {"regular": (regular, {}), "pipo": (pipo, {"pipo_confidence_threshold": -1.0})}
    encs = [tok(p, return_tensors="pt", add_special_tokens=False) for p in prompts]
    for model, extra in sides.values():  # warm-up (the PIPO lean-step probe runs here)
        _decode_seconds(model, encs[0], new_tokens, tok.pad_token_id, extra)
    seconds = dict.fromkeys(sides, 0.0)
    for _ in range(reps):
        for enc in tqdm(encs, desc=f"{layers} layers", unit="prompt", leave=False):
            for key, (model, extra) in sides.items():
                seconds[key] += _decode_seconds(model, enc, new_tokens, tok.pad_token_id, extra)
    tokens = reps * len(encs) * (new_tokens - 1)
    tpot = {key: 1000 * s / tokens for key, s in seconds.items()}
    return {"layers": layers, "regular_tpot_ms": tpot["regular"], "pipo_tpot_ms": tpot["pipo"],
            "tpot_ratio": tpot["regular"] / tpot["pipo"]}


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers_pipo import demo

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(demo.BASE_MODEL_DIR)
    template = AutoModelForCausalLM.from_pretrained(demo.BASE_MODEL_DIR)
    prompts = [f"Q: {e}\nA:" for e in demo.held_out_problems()[: args.problems]]
    rows = [measure(n, template, tok, prompts, args.new_tokens, args.reps) for n in args.layers]
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
