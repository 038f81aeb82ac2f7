"""`pipo convert-reference SRC DST`: convert a checkpoint in the PIPO authors' layout into a PIPO checkpoint."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
expected source layout (the authors' released checkpoints, DESIGN §6.1):
  SRC/config.json            the backbone's text config, flat ("model_type": "qwen3_5_text") or nested under
                             "text_config"; "architectures": ["Qwen3_5ForCausalPIPO"], "compressor_type":
                             "linear" | "mlp", "pad_token_id" (248044 for Qwen3.5), "mtp_num_hidden_layers": 1
  SRC/model.safetensors      or sharded with model.safetensors.index.json, holding:
    model.language_model.*   backbone (embed_tokens, layers.N.*, norm); a bare "model.*" prefix is accepted
    lm_head.weight           only when untied (absent when tied, e.g. Qwen3.5-4B)
    mtp.fc.weight, mtp.pre_fc_norm_embedding.weight, mtp.pre_fc_norm_hidden.weight,
    mtp.layers.0.*  (Qwen3.5 q_proj has 2*heads*head_dim rows: query + output gate), mtp.norm.weight
    compressor.linear.{weight,bias}   or   compressor.mlp.{0,2}.{weight,bias}
    confidence_head.norm.weight, confidence_head.fc1.weight, confidence_head.fc2.weight
    model.visual.*           vision tower of the VL release: ignored
  SRC/generation_config.json, tokenizer files   optional; copied over (the PAD is removed from the EOS ids; when
                             no EOS is left, e.g. a Qwen3.5 config listing only 248044, the tokenizer's eos_token
                             is used: <|im_end|> 248046)
  optional config fields     mtp_loss_weight, confidence_loss_weight, conf_threshold / pipo_conf_threshold (τ):
                             kept in the converted config / generation_config.json

unmerged LoRA adapters (DESIGN §6.2): if SRC holds adapter_config.json + adapter_model.safetensors (keys
base_model.model.<module>.lora_{A,B}.weight plus full copies of the modules_to_save modules), the adapter is
merged into --base (default: its base_model_name_or_path when that is a local folder) before converting.
DoRA and embedding LoRA are refused.

Every source tensor must map onto a parameter of the PIPO model and every parameter must be filled; otherwise
the command fails and lists the unexpected and the missing keys. The result is written with save_pretrained
(remote code, auto_map, model card) and, unless --no-verify, reloaded to check it.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-reference",
        help="Convert a checkpoint in the PIPO authors' released layout (or an unmerged LoRA adapter) to ours.",
        description="Convert a checkpoint in the PIPO authors' released layout into a PipoForCausalLM checkpoint.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="Reference checkpoint folder, or an unmerged LoRA adapter folder.")
    parser.add_argument("dst", metavar="DST", help="Output folder for the PIPO checkpoint.")
    parser.add_argument("--base", help="Base checkpoint (reference layout) of a LoRA adapter SRC.")
    parser.add_argument("--compressor-type", choices=["linear", "mlp"],
                        help="Override the compressor type (must agree with the compressor.* tensors).")
    parser.add_argument("--pad-token-id", type=int, help="PIPO PAD id (default: the config's; 248044 for Qwen3.5).")
    parser.add_argument("--eos-token-id", type=int, nargs="+",
                        help="EOS id(s) (default: generation_config.json's, else the config's; PAD is removed; "
                             "the tokenizer's eos_token when none is left).")
    parser.add_argument("--pipo-confidence-threshold", type=float,
                        help="Draft gate τ stored in generation_config.json (default: the source config's "
                             "conf_threshold, else 0.95).")
    parser.add_argument("--max-shard-size", default="5GB", help="Largest safetensors shard to write (default 5GB).")
    parser.add_argument("--overwrite", action="store_true", help="Write into a non-empty DST.")
    parser.add_argument("--no-verify", action="store_true",
                        help="Skip reloading the result (saves memory for large models; the key check still runs).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transformers_pipo.conversion import ReferenceLayoutError, convert_reference

    try:
        report = convert_reference(
            args.src,
            args.dst,
            base=args.base,
            compressor_type=args.compressor_type,
            pad_token_id=args.pad_token_id,
            eos_token_id=args.eos_token_id,
            pipo_confidence_threshold=args.pipo_confidence_threshold,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            verify=not args.no_verify,
        )
    except (ReferenceLayoutError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"pipo convert-reference: error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
