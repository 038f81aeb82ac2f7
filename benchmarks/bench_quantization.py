"""Memory footprint and PIPO generate speed of one model in fp32, int8 and nf4 (and torchao int8).

A random PIPO model with a chosen backbone shape is saved once, then reloaded per mode with
`from_pretrained(..., quantization_config=...)` and timed with greedy `generate`. The compressor and the
confidence head stay in float32 in every mode (`_keep_in_fp32_modules`).

Modes: `fp32` (no quantization), `int8` (bitsandbytes LLM.int8), `nf4` (bitsandbytes 4-bit NF4, fp32 compute on
CPU / fp16 on CUDA), `torchao-int8` (torchao int8 weight-only). A mode whose package is missing is reported as
skipped.

Memory is the bytes actually held by parameters and buffers (quantized storage, scales and quantization state
included; tied tensors counted once), next to transformers' `get_memory_footprint()`. Speed is real generated
tokens per second of the median timed call (`--repeats` calls after a process-wide and a per-mode warm-up). All
modes are loaded first and timed round-robin, so a busy machine slows them alike. `--pipo-confidence-threshold -1` (the default) commits
every draft, so each backbone step yields two tokens, as a trained model with a high commit rate would.

Example (the numbers in benchmarks/results/ were produced like this):
    python benchmarks/bench_quantization.py --hidden 1024 --layers 8 --vocab 32000 --max-new-tokens 32 \
        --output benchmarks/results/bench_quantization.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

MODES = ("fp32", "int8", "nf4", "torchao-int8")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen3", choices=["qwen3", "llama", "qwen3_5"], help="Backbone family.")
    parser.add_argument("--hidden", type=int, default=1024, help="Hidden size (multiple of 64).")
    parser.add_argument("--layers", type=int, default=8, help="Backbone layers.")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 3 × hidden).")
    parser.add_argument("--heads", type=int, default=16, help="Attention heads (KV heads = heads / 2).")
    parser.add_argument("--vocab", type=int, default=32000, help="Vocabulary size.")
    parser.add_argument("--prompt-len", type=int, default=64, help="Prompt tokens.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Tokens generated per call.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed generate calls per mode.")
    parser.add_argument("--pipo-confidence-threshold", type=float, default=-1.0, help="Draft gate τ (-1 commits every draft).")
    parser.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated subset of {MODES}.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/bench_quantization.json"),
                        help="JSON file for the results.")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.modes.split(",")) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {MODES}")
    if args.hidden % 64:
        parser.error(f"--hidden must be a multiple of 64 (bitsandbytes 4-bit blocks), got {args.hidden}")
    return args


def backbone_config(args):
    from transformers import LlamaConfig, Qwen3Config
    from transformers.models.qwen3_5 import Qwen3_5TextConfig

    h, heads = args.hidden, args.heads
    common = dict(vocab_size=args.vocab, hidden_size=h, intermediate_size=args.intermediate or 3 * h,
                  num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                  bos_token_id=1, eos_token_id=2, max_position_embeddings=4096)
    if args.family == "llama":
        return LlamaConfig(**common)
    if args.family == "qwen3_5":
        return Qwen3_5TextConfig(**common, head_dim=h // heads, linear_num_key_heads=heads // 2,
                                 linear_num_value_heads=32, linear_key_head_dim=64, linear_value_head_dim=64)
    return Qwen3Config(**common, head_dim=h // heads, tie_word_embeddings=True)


def tensor_bytes(t) -> int:
    """Bytes held by a tensor, looking inside tensor subclasses (torchao) and bitsandbytes quantization state."""
    total = 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        total += sum(tensor_bytes(getattr(t, n)) for n in names)
    else:
        total += t.numel() * t.element_size()
    for attr in ("SCB",):  # bitsandbytes int8 row scales
        extra = getattr(t, attr, None)
        if isinstance(extra, torch.Tensor):
            total += extra.numel() * extra.element_size()
    state = getattr(t, "quant_state", None)  # bitsandbytes 4-bit: absmax, code (and nested state2)
    while state is not None:
        for attr in ("absmax", "code"):
            extra = getattr(state, attr, None)
            if isinstance(extra, torch.Tensor):
                total += extra.numel() * extra.element_size()
        state = getattr(state, "state2", None)
    return total


def held_bytes(model) -> tuple[int, int]:
    """(all bytes, bytes of the compressor + confidence head) of parameters and buffers, tied tensors once."""
    seen, total, heads = set(), 0, 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = tensor_bytes(tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor)
        total += size
        if name.startswith(("compressor.", "confidence_head.")):
            heads += size
    return total, heads


def quantization_config(mode: str, device: str):
    if mode == "fp32":
        return None
    if mode in ("int8", "nf4"):
        import bitsandbytes  # noqa: F401  (ImportError -> skipped)
        from transformers import BitsAndBytesConfig

        if mode == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        compute = torch.float16 if device.startswith("cuda") else torch.float32
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(quant_type=Int8WeightOnlyConfig())


def load_mode(mode, folder, args):
    """`(model, info)` for one mode, or `(None, {"mode", "skipped"})` when its package is missing."""
    from transformers import AutoModelForCausalLM

    try:
        qconfig = quantization_config(mode, args.device)
    except ImportError as err:
        return None, {"mode": mode, "skipped": f"{err.name or err} is not installed"}
    kwargs = {"quantization_config": qconfig} if qconfig is not None else {}
    if args.device != "cpu":
        kwargs["device_map"] = {"": args.device}
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    load_s = time.perf_counter() - start
    if qconfig is None and args.device != "cpu":
        model.to(args.device)
    total, heads = held_bytes(model)
    return model, {"mode": mode, "held_bytes": total, "fp32_heads_bytes": heads,
                   "hf_memory_footprint": model.get_memory_footprint(), "load_s": round(load_s, 3)}


def timed_generate(model, prompt, args):
    """(seconds, new tokens, committed drafts, decode steps) of one greedy generate call."""
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False,
                         pipo_confidence_threshold=args.pipo_confidence_threshold, return_dict_in_generate=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return (seconds, out.sequences.shape[1] - prompt.shape[1], int(out.committed_drafts.sum()),
            int(out.decode_steps.sum()))


def benchmark_modes(modes, folder, args, prompt) -> list[dict]:
    """Load every mode, warm each up, then time them round-robin (a busy machine slows all modes alike)."""
    loaded, results = {}, []
    for mode in tqdm(modes, desc="load + warm-up", unit="mode"):
        model, info = load_mode(mode, folder, args)
        results.append(info)
        if model is not None:
            timed_generate(model, prompt.to(args.device), args)  # warm-up (bnb CPU 4-bit repacks its weights)
            loaded[mode] = (model, info)
    runs = {mode: [] for mode in loaded}
    with tqdm(total=args.repeats * len(loaded), desc="timed generate", unit="call") as progress:
        for _ in range(args.repeats):
            for mode, (model, _) in loaded.items():
                runs[mode].append(timed_generate(model, prompt.to(args.device), args))
                progress.update(1)
    for mode, (_, info) in loaded.items():
        times = sorted(r[0] for r in runs[mode])
        tokens = sum(r[1] for r in runs[mode])
        median = times[len(times) // 2]
        info.update({
            "generated_tokens": tokens,
            "tokens_per_s": round(tokens / sum(times), 2),  # over all timed calls
            "median_call_s": round(median, 4),
            "median_tokens_per_s": round(tokens / len(times) / median, 2),
            "best_call_s": round(times[0], 4),
            "commit_rate": round(sum(r[2] for r in runs[mode]) / max(sum(r[3] for r in runs[mode]), 1), 3),
        })
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    # bitsandbytes logs one "inputs will be cast to float16" line per int8 matmul on CPU
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from transformers_pipo import PipoForCausalLM

    torch.manual_seed(args.seed)
    backbone = AutoModelForCausalLM.from_config(backbone_config(args))
    model = PipoForCausalLM.from_backbone(backbone, pad_token_id=args.vocab - 1)
    n_params = model.num_parameters()
    prompt = torch.randint(3, args.vocab - 1, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    modes = args.modes.split(",")
    for _ in range(2):  # process-wide warm-up (lazy initialisation in torch/transformers) before any timing
        model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False,
                       pipo_confidence_threshold=args.pipo_confidence_threshold)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, model_card=False)
        del model, backbone
        results = benchmark_modes(modes, folder, args, prompt)

    base = next((r for r in results if r["mode"] == "fp32" and "skipped" not in r), None)
    print(f"\nPIPO {args.family} hidden={args.hidden} layers={args.layers} vocab={args.vocab} "
          f"({n_params / 1e6:.1f} M params), prompt {args.prompt_len}, {args.max_new_tokens} new tokens, "
          f"tau={args.pipo_confidence_threshold}, device={args.device}, threads={torch.get_num_threads()}")
    header = (f"{'mode':<13} {'memory MiB':>10} {'vs fp32':>8} {'fp32 heads MiB':>14} {'tok/s':>8} {'ms/tok':>8} "
              f"{'vs fp32':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        if "skipped" in r:
            print(f"{r['mode']:<13} skipped: {r['skipped']}")
            continue
        mem_ratio = r["held_bytes"] / base["held_bytes"] if base else float("nan")
        speed_ratio = r["median_tokens_per_s"] / base["median_tokens_per_s"] if base else float("nan")
        print(f"{r['mode']:<13} {r['held_bytes'] / 2**20:>10.1f} {mem_ratio:>7.2f}x "
              f"{r['fp32_heads_bytes'] / 2**20:>14.1f} "
              f"{r['median_tokens_per_s']:>8.1f} {1000 / r['median_tokens_per_s']:>8.1f} {speed_ratio:>7.2f}x")
    print("(memory: parameters + buffers actually held; tok/s: median call; the compressor and confidence head\n"
          " stay fp32 in every mode, and embeddings / LM head are never quantized)")
    record = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": n_params,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "machine": platform.machine(),
                        "cpu_count": os.cpu_count(),
                        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
