"""TTFT/TPOT of PIPO generate vs the backbone's regular generate (and HF assisted / prompt-lookup decoding).

Everything runs in one process on the same random backbone weights, methods interleaved round-robin so that load
from other processes hits all of them alike; the figures that matter are the ratios. Also reports backbone KV-cache
bytes and the parts of one decode step, from which it prints the compute-bound limit of the TPOT ratio:

    limit = 2 (body + head) / (body + 2 head + MTP + compressor/confidence)

(the LM head runs twice per PIPO step, so on short contexts PIPO cannot reach 2x; the halved KV cache lifts the
limit on long contexts). Random weights: at tau<0 every draft is committed (2 tokens per backbone step), at tau>=1
none is (1 token per step), which brackets what a trained model does.

    python benchmarks/bench_generate.py                     # default Qwen3-style 12 x 768, vocab 32k (~110M)
    python benchmarks/bench_generate.py --quick             # smaller lengths / fewer repeats, for a smoke run

Compiled mode (`--compiled`) measures, side by side and interleaved in one process, the fastest way to run each
decoder: regular eager, regular `cache_implementation="static"` + compiled (transformers' own switch), PIPO eager and
PIPO static + compiled, each PIPO mode at tau<0 and at the model's tau. It reports TTFT, TPOT, compile time (first
call minus a warm call) and host-device syncs per decode step:

    python benchmarks/bench_generate.py --compiled --threads 1                    # 100M model, 64 / 2048 tokens
    python benchmarks/bench_generate.py --compiled --workload demo --threads 1    # embedded demo pair, arithmetic
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, Qwen3Config
from transformers.cache_utils import DynamicCache

from transformers_pipo import PipoForCausalLM


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--short", type=int, default=64, help="short prompt length (tokens)")
    p.add_argument("--long", type=int, default=2048, help="long prompt length (tokens)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--baseline-repeats", type=int, default=1,
                   help="timed runs for assisted / prompt-lookup decoding (slow with random weights)")
    p.add_argument("--assistant-tokens", type=int, default=5, help="num_assistant_tokens for assisted decoding")
    p.add_argument("--part-repeats", type=int, default=30, help="timed runs per decode-step part")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-baselines", action="store_true", help="skip assisted and prompt-lookup decoding")
    p.add_argument("--quick", action="store_true", help="short=32, long=512, new=32, repeats=1")
    p.add_argument("--compiled", action="store_true",
                   help="eager vs static+compiled, regular vs PIPO (no assisted baselines); see the module docstring")
    p.add_argument("--workload", default="synthetic", choices=["synthetic", "demo"],
                   help="synthetic: the random Qwen3-style model at --short/--long; demo: the embedded demo pair")
    p.add_argument("--device", default="cpu")
    p.add_argument("--hub-config", default=None,
                   help="build the random-weight backbone from a PIPO preset folder (e.g. hub_configs/Qwen3-0.6B-PIPO) "
                        "instead of --layers/--hidden/...")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the static paths (default: transformers' CompileConfig default)")
    p.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/bench_generate*.json)")
    args = p.parse_args(argv)
    if args.out is None:
        suffix = "" if not args.compiled else ("_compiled" if args.workload == "synthetic" else "_demo_compiled")
        args.out = f"benchmarks/results/bench_generate{suffix}.json"
    if args.quick:
        args.short, args.long, args.new_tokens, args.repeats, args.part_repeats = 32, 512, 32, 1, 10
        args.baseline_repeats = 1
    return args


def build_models(args):
    torch.manual_seed(0)
    if args.hub_config:
        return build_hub_models(args)
    config = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=max(4096, 2 * args.long), tie_word_embeddings=True,
        eos_token_id=None, bos_token_id=None,
    )
    dtype = getattr(torch, args.dtype)
    backbone = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    # PIPO shares the backbone's modules; keep the original LM untouched by converting a copy of the state.
    twin = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    twin.load_state_dict(backbone.state_dict())
    pipo = PipoForCausalLM.from_backbone(twin, pad_token_id=args.vocab - 1).eval()
    draft_config = Qwen3Config(
        vocab_size=args.vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, tie_word_embeddings=True, eos_token_id=None, bos_token_id=None,
    )
    draft = AutoModelForCausalLM.from_config(draft_config).to(dtype).eval()
    for model in (backbone, pipo, draft):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = args.vocab - 1
        model.generation_config.do_sample = False
    return backbone, pipo, draft


def build_hub_models(args):
    """Random-weight backbone of a preset's architecture (weights never downloaded), its PIPO twin, no draft."""
    from transformers import AutoConfig

    import transformers_pipo  # noqa: F401  (registers PipoConfig)

    pipo_config = AutoConfig.from_pretrained(args.hub_config)
    config = pipo_config.get_text_config()
    config.eos_token_id = None
    args.vocab = config.vocab_size
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        backbone = AutoModelForCausalLM.from_config(config).to(dtype).eval()
        twin = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    twin.load_state_dict(backbone.state_dict())
    pipo = PipoForCausalLM.from_backbone(twin, pad_token_id=pipo_config.pad_token_id).eval()
    for model in (backbone, pipo):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = pipo_config.pad_token_id
        model.generation_config.do_sample = False
    return backbone, pipo, None


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def methods(backbone, pipo, draft, with_baselines: bool, assistant_tokens: int):
    def regular(ids, n, **kw):
        return backbone.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    def pipo_commit(ids, n, **kw):
        return pipo.generate(ids, max_new_tokens=n, pipo_confidence_threshold=-1.0, **kw)

    def pipo_nodraft(ids, n, **kw):
        return pipo.generate(ids, max_new_tokens=n, pipo_confidence_threshold=1.0, **kw)

    table = {"regular": regular, "pipo tau<0": pipo_commit, "pipo tau>=1": pipo_nodraft}
    if with_baselines:
        table["assisted (small draft)"] = lambda ids, n, **kw: backbone.generate(
            ids, max_new_tokens=n, min_new_tokens=n, assistant_model=draft, num_assistant_tokens=assistant_tokens,
            num_assistant_tokens_schedule="constant", **kw)
        table["prompt lookup"] = lambda ids, n, **kw: backbone.generate(
            ids, max_new_tokens=n, min_new_tokens=n, prompt_lookup_num_tokens=10, **kw)
    return table


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


BASELINES = ("assisted (small draft)", "prompt lookup")


def measure_end_to_end(table, prompt, new_tokens, repeats, baseline_repeats, bar) -> dict:
    """Median TTFT (generate 1 token) and TPOT ((T(N) - T(1)) / (N - 1)) per method, interleaved round-robin."""
    ttft = {k: [] for k in table}
    total = {k: [] for k in table}
    with torch.inference_mode():
        for fn in table.values():  # warm-up
            fn(prompt, 2)
        for r in range(repeats):
            for name, fn in table.items():
                if name in BASELINES and r >= baseline_repeats:
                    continue
                ttft[name].append(timed(lambda: fn(prompt, 1)))
                total[name].append(timed(lambda: fn(prompt, new_tokens)))
                bar.update(1)
    out = {}
    for name in table:
        t1, tn = statistics.median(ttft[name]), statistics.median(total[name])
        out[name] = {"ttft_s": t1, "total_s": tn, "tpot_s": max(tn - t1, 1e-9) / (new_tokens - 1)}
    return out


def measure_cache(backbone, pipo, prompt, new_tokens) -> dict:
    with torch.inference_mode():
        reg = backbone.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                return_dict_in_generate=True)
        pip = pipo.generate(prompt, max_new_tokens=new_tokens, pipo_confidence_threshold=-1.0,
                            return_dict_in_generate=True)
    return {
        "regular_backbone_kv_bytes": cache_bytes(reg.cache),
        "pipo_backbone_kv_bytes": cache_bytes(pip.cache),
        "pipo_mtp_kv_bytes": cache_bytes(pip.mtp_cache),
        "pipo_tokens_per_backbone_step": float((pip.sequences.shape[1] - prompt.shape[1]) / pip.backbone_forwards),
    }


def _median_time(fn, repeats: int) -> float:
    fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def measure_parts(backbone, pipo, context_tokens: int, repeats: int) -> dict:
    """Time one decode step's parts: backbone body at `context_tokens` (regular) and `context_tokens/2` latents
    (PIPO), the LM head, the MTP layer, and compressor + confidence head."""
    hidden = pipo.config.hidden_size
    dtype = pipo.lm_head.weight.dtype
    body = backbone.model
    pos = lambda n: torch.tensor([[n]])  # noqa: E731

    def body_step(n_ctx: int) -> float:
        cache = DynamicCache(config=backbone.config)
        with torch.inference_mode():
            body(inputs_embeds=torch.randn(1, n_ctx, hidden, dtype=dtype), cache=cache, use_cache=True)
            x = torch.randn(1, 1, hidden, dtype=dtype)

            def step():
                body(inputs_embeds=x, position_ids=pos(n_ctx), cache=cache, use_cache=True)
                cache.crop(-1)

            return _median_time(step, repeats)

    def mtp_step(n_ctx: int) -> float:
        cache = pipo.new_mtp_cache()
        with torch.inference_mode():
            ids = torch.randint(0, pipo.config.vocab_size - 1, (1, n_ctx))
            pipo.run_mtp(ids, torch.randn(1, n_ctx, hidden, dtype=dtype), None, torch.arange(n_ctx)[None],
                         cache=cache, use_cache=True)
            tok, h = ids[:, :1], torch.randn(1, 1, hidden, dtype=dtype)

            def step():
                pipo.run_mtp(tok, h, None, pos(n_ctx), cache=cache, use_cache=True)
                cache.crop(-1)

            return _median_time(step, repeats)

    with torch.inference_mode():
        h = torch.randn(1, 1, hidden, dtype=dtype)
        head = _median_time(lambda: pipo.lm_head(h), repeats)
        pair = torch.randint(0, pipo.config.vocab_size - 1, (1, 2))
        comp_conf = _median_time(lambda: (pipo.embed_pairs(pair), pipo.confidence_logits(h, h)), repeats)
    latents = max(1, context_tokens // 2)
    return {
        "context_tokens": context_tokens,
        "body_regular_s": body_step(context_tokens),
        "body_pipo_s": body_step(latents),
        "lm_head_s": head,
        "mtp_s": mtp_step(latents),
        "compressor_confidence_s": comp_conf,
    }


def compute_bound_limit(parts: dict) -> float:
    regular = parts["body_regular_s"] + parts["lm_head_s"]
    pipo = parts["body_pipo_s"] + 2 * parts["lm_head_s"] + parts["mtp_s"] + parts["compressor_confidence_s"]
    return 2 * regular / pipo


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compiled:
        return run_compiled(args)
    backbone, pipo, draft = build_models(args)
    table = methods(backbone, pipo, draft, not args.no_baselines, args.assistant_tokens)
    results = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "backbone_params": n_params(backbone),
        "pipo_params": n_params(pipo),
        "torch_threads": torch.get_num_threads(),
        "workloads": {},
    }
    gen = torch.Generator().manual_seed(0)
    n_base = sum(name in BASELINES for name in table)
    steps = 2 * ((len(table) - n_base) * args.repeats + n_base * min(args.baseline_repeats, args.repeats))
    with tqdm(total=steps, desc="bench_generate") as bar:
        for label, length in (("short", args.short), ("long", args.long)):
            prompt = torch.randint(0, args.vocab - 1, (1, length), generator=gen)
            timings = measure_end_to_end(table, prompt, args.new_tokens, args.repeats, args.baseline_repeats, bar)
            parts = measure_parts(backbone, pipo, length, args.part_repeats)
            results["workloads"][label] = {
                "prompt_tokens": length,
                "new_tokens": args.new_tokens,
                "timings": timings,
                "ratios_vs_regular": {
                    name: {
                        "ttft": timings["regular"]["ttft_s"] / t["ttft_s"],
                        "tpot": timings["regular"]["tpot_s"] / t["tpot_s"],
                    }
                    for name, t in timings.items()
                },
                "cache": measure_cache(backbone, pipo, prompt, args.new_tokens),
                "decode_step_parts": parts,
                "compute_bound_tpot_limit": compute_bound_limit(parts),
            }
    print_report(results)
    return write_results(results, args.out)


def write_results(results: dict, path: str) -> int:
    """Write the results JSON (creating its folder) and say where; returns the exit code."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return 0


def print_report(results: dict) -> None:
    print(f"\nbackbone {results['backbone_params'] / 1e6:.1f}M params, PIPO {results['pipo_params'] / 1e6:.1f}M, "
          f"{results['torch_threads']} threads")
    for label, w in results["workloads"].items():
        print(f"\n== {label}: {w['prompt_tokens']}-token prompt, {w['new_tokens']} new tokens ==")
        print(f"{'method':<24}{'TTFT ms':>10}{'TPOT ms':>10}{'TTFT x':>9}{'TPOT x':>9}")
        for name, t in w["timings"].items():
            r = w["ratios_vs_regular"][name]
            print(f"{name:<24}{1e3 * t['ttft_s']:>10.1f}{1e3 * t['tpot_s']:>10.2f}{r['ttft']:>9.2f}{r['tpot']:>9.2f}")
        c = w["cache"]
        print(f"KV cache: regular {c['regular_backbone_kv_bytes'] / 2**20:.1f} MiB | PIPO backbone "
              f"{c['pipo_backbone_kv_bytes'] / 2**20:.1f} MiB + MTP {c['pipo_mtp_kv_bytes'] / 2**20:.1f} MiB | "
              f"PIPO tokens/backbone step {c['pipo_tokens_per_backbone_step']:.2f}")
        p = w["decode_step_parts"]
        print(f"step parts (ms): body regular {1e3 * p['body_regular_s']:.2f}, body PIPO {1e3 * p['body_pipo_s']:.2f}, "
              f"LM head {1e3 * p['lm_head_s']:.2f}, MTP {1e3 * p['mtp_s']:.2f}, "
              f"compressor+conf {1e3 * p['compressor_confidence_s']:.2f}")
        limit = w["compute_bound_tpot_limit"]
        achieved = w["ratios_vs_regular"]["pipo tau<0"]["tpot"]
        print(f"compute-bound TPOT limit {limit:.2f}x; PIPO tau<0 reaches {achieved:.2f}x "
              f"({achieved / limit:.0%} of the limit)")


# ----------------------------------------------------------------------------------------------------------------------
# Compiled mode: the strongest baseline side by side
# ----------------------------------------------------------------------------------------------------------------------

SYNC_METHODS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero")


class HostSyncCounter:
    """Counts host-device synchronisations while active: tensor -> Python conversions (`bool`, `item`, `tolist`,
    `int`, ...), `nonzero` and boolean-mask indexing."""

    def __init__(self):
        self.count = 0
        self._saved = {}

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS + ("__getitem__", "__setitem__")}
        self._saved_nonzero = torch.nonzero

        def counted(fn):
            def wrapper(*a, **k):
                self.count += 1
                return fn(*a, **k)
            return wrapper

        def bool_index(index) -> bool:
            items = index if isinstance(index, tuple) else (index,)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

        get, put = self._saved["__getitem__"], self._saved["__setitem__"]

        def getitem(t, index):
            self.count += bool_index(index)
            return get(t, index)

        def setitem(t, index, value):
            self.count += bool_index(index)
            return put(t, index, value)

        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, counted(self._saved[name]))
        torch.Tensor.__getitem__, torch.Tensor.__setitem__ = getitem, setitem
        torch.nonzero = counted(self._saved_nonzero)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = self._saved_nonzero


def compile_config(mode: str | None):
    """transformers' CompileConfig with `_compile_all_devices` (transformers compiles only on CUDA-like devices without it)."""
    from transformers.generation.configuration_utils import CompileConfig

    config = CompileConfig() if mode is None else CompileConfig(mode=mode)
    config._compile_all_devices = True
    return config


def compiled_methods(backbone, pipo, model_tau: float, mode: str | None) -> dict:
    """Method name -> `fn(ids, n) -> (output, backbone steps)`; every method emits exactly `n` new tokens."""
    cc = compile_config(mode)
    static = dict(cache_implementation="static", compile_config=cc)

    def regular(extra):
        def fn(ids, n):
            out = backbone.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **extra)
            return out, n
        return fn

    def pipo_fn(tau, extra):
        def fn(ids, n):
            out = pipo.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                                pipo_confidence_threshold=tau, return_dict_in_generate=True, **extra)
            return out, out.backbone_forwards
        return fn

    return {
        "regular eager": regular({}),
        "regular static+compiled": regular(static),
        "pipo eager tau<0": pipo_fn(-1.0, {}),
        f"pipo eager tau={model_tau:g}": pipo_fn(model_tau, {}),
        "pipo static+compiled tau<0": pipo_fn(-1.0, static),
        f"pipo static+compiled tau={model_tau:g}": pipo_fn(model_tau, static),
    }


def measure_compiled(table: dict, prompt, new_tokens: int, repeats: int, bar) -> dict:
    """Per method: compile (warm-up) time, median TTFT and TPOT (interleaved round-robin), host syncs per decode
    step and tokens per backbone step."""
    out = {name: {"ttft": [], "total": []} for name in table}
    with torch.inference_mode():
        for name, fn in table.items():
            # Warm-up at the full length first, so the 1-token call reuses the same static caches and graphs.
            first = timed(lambda: fn(prompt, new_tokens))
            fn(prompt, 1)
            warm = timed(lambda: fn(prompt, new_tokens))
            out[name]["compile_s"] = max(0.0, first - warm)
            with HostSyncCounter() as short:
                _, steps_short = fn(prompt, 2)
            with HostSyncCounter() as long:
                result, steps_long = fn(prompt, new_tokens)
            out[name]["host_syncs_per_step"] = (long.count - short.count) / max(1, steps_long - steps_short)
            out[name]["tokens_per_backbone_step"] = new_tokens / steps_long
            bar.update(1)
        for _ in range(repeats):
            for name, fn in table.items():
                out[name]["ttft"].append(timed(lambda: fn(prompt, 1)))
                out[name]["total"].append(timed(lambda: fn(prompt, new_tokens)))
                bar.update(1)
    results = {}
    for name, r in out.items():
        t1, tn = statistics.median(r["ttft"]), statistics.median(r["total"])
        results[name] = {
            "ttft_s": t1, "total_s": tn, "tpot_s": max(tn - t1, 1e-9) / (new_tokens - 1),
            "compile_s": r["compile_s"], "host_syncs_per_step": r["host_syncs_per_step"],
            "tokens_per_backbone_step": r["tokens_per_backbone_step"],
        }
    return results


def _demo_models(args):
    from transformers_pipo import demo

    pipo, base, tokenizer = demo.load_models()
    pipo, base = pipo.to(args.device), base.to(args.device)
    for model in (pipo, base):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    problem = demo.held_out_problems()[0]
    prompt = tokenizer(demo.format_prompt(problem), return_tensors="pt", add_special_tokens=False)["input_ids"]
    return base, pipo, [("demo", prompt.to(args.device))], f"arithmetic prompt {problem!r}"


def run_compiled(args) -> int:
    if args.workload == "demo":
        backbone, pipo, prompts, description = _demo_models(args)
    else:
        backbone, pipo, _ = build_models(args)
        backbone, pipo = backbone.to(args.device), pipo.to(args.device)
        gen = torch.Generator().manual_seed(0)
        prompts = [(label, torch.randint(0, args.vocab - 1, (1, n), generator=gen).to(args.device))
                   for label, n in (("short", args.short), ("long", args.long))]
        description = f"random-weight {args.hub_config}" if args.hub_config else "random Qwen3-style model"
        if args.device != "cpu" and torch.cuda.is_available():
            description += f" on {torch.cuda.get_device_name()}"
    model_tau = float(pipo.generation_config.pipo_confidence_threshold)
    table = compiled_methods(backbone, pipo, model_tau, args.compile_mode)
    results = {
        "mode": "compiled",
        "workload": args.workload,
        "description": description,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "backbone_params": n_params(backbone),
        "pipo_params": n_params(pipo),
        "torch_threads": torch.get_num_threads(),
        "device": str(args.device),
        "model_tau": model_tau,
        "workloads": {},
    }
    with tqdm(total=len(prompts) * len(table) * (1 + args.repeats), desc="bench_generate --compiled") as bar:
        for label, prompt in prompts:
            timings = measure_compiled(table, prompt, args.new_tokens, args.repeats, bar)
            parts = measure_parts(backbone, pipo, prompt.shape[1], args.part_repeats) if args.device == "cpu" \
                else None
            ref_eager, ref_compiled = timings["regular eager"], timings["regular static+compiled"]
            results["workloads"][label] = {
                "prompt_tokens": int(prompt.shape[1]),
                "new_tokens": args.new_tokens,
                "timings": timings,
                "ratios": {
                    name: {
                        "tpot_vs_regular_eager": ref_eager["tpot_s"] / t["tpot_s"],
                        "tpot_vs_regular_compiled": ref_compiled["tpot_s"] / t["tpot_s"],
                        "ttft_vs_regular_eager": ref_eager["ttft_s"] / t["ttft_s"],
                        "ttft_vs_regular_compiled": ref_compiled["ttft_s"] / t["ttft_s"],
                    }
                    for name, t in timings.items()
                },
                "decode_step_parts": parts,
                "compute_bound_tpot_limit": None if parts is None else compute_bound_limit(parts),
            }
    print_compiled_report(results)
    return write_results(results, args.out)


def print_compiled_report(results: dict) -> None:
    print(f"\n{results['description']}: backbone {results['backbone_params'] / 1e6:.1f}M params, "
          f"{results['torch_threads']} threads, device {results['device']}, model tau {results['model_tau']:g}")
    for label, w in results["workloads"].items():
        print(f"\n== {label}: {w['prompt_tokens']}-token prompt, {w['new_tokens']} new tokens ==")
        print(f"{'method':<30}{'TTFT ms':>9}{'TPOT ms':>9}{'compile s':>10}{'syncs/step':>11}{'tok/step':>9}"
              f"{'TPOT x eager':>13}{'TPOT x compiled':>16}{'TTFT x':>8}")
        for name, t in w["timings"].items():
            r = w["ratios"][name]
            print(f"{name:<30}{1e3 * t['ttft_s']:>9.1f}{1e3 * t['tpot_s']:>9.2f}{t['compile_s']:>10.1f}"
                  f"{t['host_syncs_per_step']:>11.1f}{t['tokens_per_backbone_step']:>9.2f}"
                  f"{r['tpot_vs_regular_eager']:>13.2f}{r['tpot_vs_regular_compiled']:>16.2f}"
                  f"{r['ttft_vs_regular_eager']:>8.2f}")
        limit = w["compute_bound_tpot_limit"]
        if limit is not None:
            eager = w["ratios"]["pipo eager tau<0"]["tpot_vs_regular_eager"]
            compiled = w["ratios"]["pipo static+compiled tau<0"]["tpot_vs_regular_compiled"]
            print(f"compute-bound TPOT limit {limit:.2f}x (eager parts); PIPO tau<0 reaches {eager:.2f}x eager "
                  f"({eager / limit:.0%}) and {compiled:.2f}x compiled ({compiled / limit:.0%})")


if __name__ == "__main__":
    raise SystemExit(main())
