"""`pipo generate`: stream a completion from a PIPO checkpoint (the embedded demo model by default)."""

from __future__ import annotations

import argparse
import sys
import time

from transformers_pipo.cli import check_prompt_length, positive_int
from ._fast_path import add_fast_path_argument, apply_fast_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="Generate text from a PIPO checkpoint, streaming to the terminal.",
        description=__doc__ + " A bare arithmetic expression such as 47*83-5 is wrapped in the demo task's prompt "
        "format when the embedded model is used; '\\n' in --prompt means a newline unless --raw is given.",
    )
    parser.add_argument("--model", default=None, help="PIPO checkpoint folder or Hub id (default: the embedded one).")
    parser.add_argument("--prompt", required=True, help="Prompt text.")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="Budget of real tokens (default 256).")
    parser.add_argument("--pipo-confidence-threshold", type=float, default=None,
                        help="Confidence threshold τ (default: the checkpoint's generation_config).")
    parser.add_argument("--sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (with --sample).")
    parser.add_argument("--regular", action="store_true", help="Decode token by token (pipo_decoding=False).")
    parser.add_argument("--raw", action="store_true", help="Use --prompt verbatim (no '\\n' unescaping).")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow remote code for Hub checkpoints.")
    add_fast_path_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    import transformers_pipo  # noqa: F401  (registers the PIPO classes)
    from transformers_pipo import demo

    path = args.model or str(demo.PIPO_MODEL_DIR)
    prompt = args.prompt if args.raw else args.prompt.replace("\\n", "\n")
    if args.model is None and demo.is_expression(prompt.strip()):
        prompt = demo.format_prompt(prompt.strip())
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=args.trust_remote_code).eval()
    is_pipo = getattr(model.config, "model_type", None) == "pipo"
    apply_fast_path([model], "eager" if args.regular else args.fast_path)  # the token-level fallback has no cache
    if not is_pipo:
        print(f"pipo generate: {path} is not a PIPO checkpoint; decoding it token by token.", file=sys.stderr)

    enc = tokenizer(prompt, return_tensors="pt")
    check_prompt_length(enc["input_ids"].shape[1], model.config)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, return_dict_in_generate=True,
                  streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    if args.sample:
        kwargs["temperature"] = args.temperature
    if tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    if is_pipo:
        if args.regular:
            kwargs["pipo_decoding"] = False
        elif args.pipo_confidence_threshold is not None:
            kwargs["pipo_confidence_threshold"] = args.pipo_confidence_threshold
    sys.stdout.write(prompt)
    sys.stdout.flush()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    seconds = time.perf_counter() - start
    sequences = out.sequences if hasattr(out, "sequences") else out
    new = sequences[0, enc["input_ids"].shape[1]:]
    if tokenizer.pad_token_id is not None and not is_pipo:
        new = new[new != tokenizer.pad_token_id]
    n = int(new.numel())
    stats = f"{n} tokens in {seconds:.2f}s ({n / max(seconds, 1e-9):.1f} tokens/s)"
    if is_pipo and getattr(out, "decode_steps", None) is not None:
        steps = int(out.decode_steps[0])
        stats += f", {steps} backbone steps, commit rate {float(out.commit_rate[0]):.1%}"
    print(f"\n[{stats}]", file=sys.stderr)
    return 0
