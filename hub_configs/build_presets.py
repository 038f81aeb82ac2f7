"""Build the PIPO preset folders in `hub_configs/` from the published hyper-parameters of their backbones.

Every preset goes through `PipoConfig`, so the folders are valid, mutually consistent and loadable with
`AutoConfig.from_pretrained(folder, trust_remote_code=True)` (or with `transformers_pipo` imported). Each folder gets

- `config.json`: a full `PipoConfig` (the whole backbone config nested under `backbone_config`) with
  `architectures = ["PipoForCausalLM"]` and an `auto_map` pointing at `configuration_pipo.PipoConfig` /
  `modeling_pipo.PipoForCausalLM` (the remote-code files that `save_pretrained` ships next to the weights);
- `generation_config.json`: the backbone's published sampling defaults plus PIPO's (`pad_token_id` = the PIPO PAD,
  PAD removed from the EOS ids, `pipo_confidence_threshold` = τ);
- the remote code `auto_map` names (`configuration_pipo.py`, `modeling_pipo.py` and the siblings they import),
  copied from `transformers_pipo/` as it is now; `--check` fails when the package's code has changed since.

Usage:
    python hub_configs/build_presets.py            # (re)write every preset folder next to this script
    python hub_configs/build_presets.py --check    # exit 1 if a committed folder differs from what would be built,
                                                   # or a preset does not load (remote code / package, meta device)
    python hub_configs/build_presets.py --out DIR  # write somewhere else

Which numbers are from memory (no network to the Hub here) is listed in `hub_configs/README.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "transformers_pipo"

AUTO_MAP = {
    "AutoConfig": "configuration_pipo.PipoConfig",
    "AutoModelForCausalLM": "modeling_pipo.PipoForCausalLM",
}
ARCHITECTURES = ["PipoForCausalLM"]
DEFAULT_TAU = 0.95  # the evaluation default of the reference (DESIGN §3.3)


@dataclass
class Preset:
    """One preset: the backbone's published config fields plus the PIPO choices."""

    name: str  # folder name
    base_model: str  # Hub id of the backbone (recorded as backbone_config._name_or_path)
    family: str  # "qwen3" | "llama" | "qwen3_5_text"
    backbone: dict  # published config fields of the backbone (text part)
    pad_token_id: int  # PIPO PAD (never an EOS id)
    generation: dict  # published sampling defaults of the backbone
    compressor_type: str = "mlp"
    mtp_init: str = "last_layer"
    norm_style: str = "w"
    confidence_threshold: float = DEFAULT_TAU
    nominal_params: float = 0.0  # published backbone size, for the size test
    notes: list[str] = field(default_factory=list)


def _qwen3(hidden, intermediate, layers, heads, kv_heads):
    return {
        "vocab_size": 151936,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "bos_token_id": 151643,
        "eos_token_id": 151645,  # <|im_end|>
        "dtype": "bfloat16",
    }


QWEN3_GENERATION = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}
QWEN3_PAD = 151643  # <|endoftext|>: the Qwen tokenizers' pad token; PIPO uses it as PAD as the authors do for Qwen3.5


def _llama32(hidden, intermediate, layers, heads, kv_heads):
    return {
        "vocab_size": 128256,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "use_cache": True,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "bos_token_id": 128000,
        "eos_token_id": 128001,  # <|end_of_text|> (base models)
        "dtype": "bfloat16",
    }


LLAMA_GENERATION = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
LLAMA_PAD = 128004  # <|finetune_right_pad_id|>, a reserved special token of the Llama 3.1+ tokenizer


def _qwen35(hidden, intermediate, tie):
    return {
        "vocab_size": 248320,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "hidden_act": "silu",
        "max_position_embeddings": 262144,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "tie_word_embeddings": tie,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        # three Gated-DeltaNet (linear-attention) layers, then one full-attention layer, repeated
        "layer_types": ["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(32)],
        "full_attention_interval": 4,
        "attn_output_gate": True,  # the gate half of q_proj (2 * heads * head_dim rows)
        "mtp_num_hidden_layers": 1,  # the native MTP layer PIPO starts from (engines default it to 0)
        "mtp_use_dedicated_embeddings": False,
        "mamba_ssm_dtype": "float32",
        # no bos_token_id: the published config has none and the tokenizer's BOS is null
        "eos_token_id": 248046,  # <|im_end|>; 248044 (<|endoftext|>) is PIPO's PAD and must not stop generation
        "dtype": "bfloat16",
    }


# The authors' evaluation sampling (temperature 1.0, top-p 0.95, top-k 20, presence penalty 1.5). transformers has no
# presence penalty (`repetition_penalty` is a different, multiplicative rule) and `generate` would silently ignore an
# unknown field, so presence_penalty is left to the serving engine (see README.md).
QWEN35_GENERATION = {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 20}
QWEN35_PRESENCE_PENALTY = 1.5
QWEN35_PAD = 248044  # hard-coded PAD of the reference implementation (DESIGN §1.1)

PRESETS = [
    Preset("Qwen3-0.6B-PIPO", "Qwen/Qwen3-0.6B", "qwen3", _qwen3(1024, 3072, 28, 16, 8), QWEN3_PAD,
           QWEN3_GENERATION, nominal_params=0.596e9),
    Preset("Qwen3-1.7B-PIPO", "Qwen/Qwen3-1.7B", "qwen3", _qwen3(2048, 6144, 28, 16, 8), QWEN3_PAD,
           QWEN3_GENERATION, nominal_params=1.72e9),
    Preset("Qwen3-4B-PIPO", "Qwen/Qwen3-4B", "qwen3", _qwen3(2560, 9728, 36, 32, 8), QWEN3_PAD,
           QWEN3_GENERATION, nominal_params=4.02e9),
    Preset("Llama-3.2-1B-PIPO", "meta-llama/Llama-3.2-1B", "llama", _llama32(2048, 8192, 16, 32, 8), LLAMA_PAD,
           LLAMA_GENERATION, nominal_params=1.24e9),
    Preset("Llama-3.2-3B-PIPO", "meta-llama/Llama-3.2-3B", "llama", _llama32(3072, 8192, 28, 24, 8), LLAMA_PAD,
           LLAMA_GENERATION, nominal_params=3.21e9),
    # The authors' released PIPO models: Qwen3.5 text backbone, MLP compressor, native MTP layer, PAD 248044.
    Preset("Qwen3.5-4B-PIPO", "Qwen/Qwen3.5-4B", "qwen3_5_text", _qwen35(2560, 9216, True), QWEN35_PAD,
           QWEN35_GENERATION, mtp_init="native", norm_style="one_plus_w", nominal_params=4.2e9),
    Preset("Qwen3.5-9B-PIPO", "Qwen/Qwen3.5-9B", "qwen3_5_text", _qwen35(4096, 12288, False), QWEN35_PAD,
           QWEN35_GENERATION, mtp_init="native", norm_style="one_plus_w", nominal_params=8.95e9),
]


def backbone_config(preset: Preset):
    """The backbone's `PreTrainedConfig`, built by its own transformers class."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(preset.family, **preset.backbone)
    config._name_or_path = preset.base_model
    config.architectures = None
    return config


def pipo_config(preset: Preset):
    """The preset's `PipoConfig` (validated: PAD inside the vocabulary and distinct from EOS)."""
    from transformers_pipo import PipoConfig

    config = PipoConfig(
        backbone_config=backbone_config(preset),
        compressor_type=preset.compressor_type,
        pad_token_id=preset.pad_token_id,
        mtp_init=preset.mtp_init,
        mtp_fc_init="hidden_only",
        norm_style=preset.norm_style,
        dtype=preset.backbone.get("dtype"),
    )
    config.architectures = list(ARCHITECTURES)
    return config


def generation_config(preset: Preset):
    """Published sampling defaults plus PIPO's PAD and τ; the PAD is never among the EOS ids."""
    from transformers import GenerationConfig

    eos = preset.backbone["eos_token_id"]
    eos = [e for e in ([eos] if isinstance(eos, int) else list(eos)) if e != preset.pad_token_id]
    return GenerationConfig(
        bos_token_id=preset.backbone.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=preset.pad_token_id,
        pipo_confidence_threshold=preset.confidence_threshold,
        **preset.generation,
    )


def _strip(d: dict) -> dict:
    """Drop fields that only record the writer's transformers version (keeps the files stable across versions)."""
    d = {k: v for k, v in d.items() if k != "transformers_version" and not (k == "_name_or_path" and not v)}
    if isinstance(d.get("backbone_config"), dict):
        d["backbone_config"] = _strip(d["backbone_config"])
    return d


def remote_code_files() -> dict[str, Path]:
    """File name → package file of the remote-code modules `auto_map` names, plus every sibling they import with
    `from .x import y`: found the way `save_pretrained` finds them (transformers' own relative-import scan)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    files = {}
    for entry in AUTO_MAP.values():
        module = PACKAGE / (entry.split(".")[0] + ".py")
        for path in [module, *map(Path, get_relative_import_files(str(module)))]:
            files[path.name] = path
    return dict(sorted(files.items()))


def render(preset: Preset) -> dict[str, str]:
    """File name → exact text of the preset folder's configs."""
    config = pipo_config(preset).to_dict()
    config["auto_map"] = dict(AUTO_MAP)
    config["architectures"] = list(ARCHITECTURES)
    gen = generation_config(preset).to_diff_dict()
    return {
        "config.json": json.dumps(_strip(config), indent=2, sort_keys=True) + "\n",
        "generation_config.json": json.dumps(_strip(gen), indent=2, sort_keys=True) + "\n",
    }


def _code_link(folder: Path, source: Path) -> str:
    """Relative symlink target from a preset folder to a package module."""
    return os.path.relpath(source.resolve(), folder.resolve())


def build(out: Path) -> list[Path]:
    """Write every preset's configs, and link its remote code to the package's modules.

    The code files are symbolic links, not copies: the presets always ship the package's current code, nothing is
    committed twice, and `AutoConfig.from_pretrained(folder, trust_remote_code=True)` (which copies the files it
    reads into transformers' module cache) and Hub uploads read the linked files' content.
    """
    written = []
    for preset in PRESETS:
        folder = out / preset.name
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in render(preset).items():
            (folder / name).write_text(text)
            written.append(folder / name)
        for name, source in remote_code_files().items():
            link = folder / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(_code_link(folder, source))
            written.append(link)
    return written


def _normalised(name: str, text: str):
    """A preset file's content as the library sees it. Code files compare byte for byte; configs are loaded and
    re-serialised (fields added to PipoConfig later with defaults do not make a committed preset stale)."""
    if not name.endswith(".json"):
        return text
    return _normalised_json(name, json.loads(text))


def _normalised_json(name: str, data: dict) -> dict:
    if name == "config.json":
        from transformers_pipo import PipoConfig

        loaded = PipoConfig.from_dict(data).to_dict()
        loaded["auto_map"], loaded["architectures"] = data.get("auto_map"), data.get("architectures")
        return _strip(loaded)
    from transformers import GenerationConfig

    return _strip(GenerationConfig.from_dict(data).to_diff_dict())


def check(out: Path) -> list[str]:
    """Names of the preset files that are missing, load differently from what `build` would write, or are not links
    to the package's remote-code modules."""
    stale = []
    code = remote_code_files()
    for preset in PRESETS:
        folder = out / preset.name
        for name, text in render(preset).items():
            path = folder / name
            if not path.is_file():
                stale.append(str(path))
                continue
            if _normalised(name, path.read_text()) != _normalised(name, text):
                stale.append(str(path))
        for name, source in code.items():
            path = folder / name
            if not path.is_symlink() or path.resolve() != source.resolve():
                stale.append(f"{path} (not a link to {source.name} of the package)")
        extra = sorted(p.name for p in folder.glob("*.py") if p.name not in code)
        stale += [f"{folder / name} (not written by build_presets.py)" for name in extra]
    return stale


LOAD_CHECK = """
import json, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM

folders = json.loads(sys.argv[1])
report = {}
for mode in ("remote", "package"):
    if mode == "remote":
        sys.modules["transformers_pipo"] = None  # as on a machine without the package: only the folder's code
    else:
        del sys.modules["transformers_pipo"]
        import transformers_pipo  # noqa: F401  (registers the pipo model type; it then wins over auto_map)
    remote = mode == "remote"
    for folder in folders:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
        report[mode + ":" + folder] = {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "params": sum(p.numel() for p in model.parameters()),
            "device": next(model.parameters()).device.type,
        }
print("\\nLOADED" + json.dumps(report))
"""


def check_loads(out: Path) -> tuple[list[str], dict]:
    """Load every preset as its README says, in a fresh process: first with `trust_remote_code=True` and the
    package not importable (the folder's own code), then with the package imported; build each model on the meta
    device. Returns `(problems, report)`; both ways must give a `PipoForCausalLM` of the same parameter count."""
    import subprocess

    folders = [str(out / preset.name) for preset in PRESETS]
    proc = subprocess.run([sys.executable, "-c", LOAD_CHECK, json.dumps(folders)], capture_output=True, text=True,
                          cwd=out)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("LOADED")), None)
    if proc.returncode != 0 or line is None:
        return [f"loading the presets failed:\n{proc.stderr[-3000:]}"], {}
    report, problems = json.loads(line[len("LOADED"):]), []
    for folder in folders:
        remote, package = report["remote:" + folder], report["package:" + folder]
        if remote["class"] != "PipoForCausalLM" or not remote["module"].startswith("transformers_modules."):
            problems.append(f"{folder}: remote code gave {remote['module']}.{remote['class']}")
        if package["module"] != "transformers_pipo.modeling_pipo":
            problems.append(f"{folder}: with the package imported got {package['module']}")
        if remote["params"] != package["params"] or {remote["device"], package["device"]} != {"meta"}:
            problems.append(f"{folder}: remote {remote} vs package {package}")
    return problems, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="Folder that receives one sub-folder per preset.")
    parser.add_argument("--check", action="store_true",
                        help="Only verify: exit 1 when a preset file is stale or missing, or a preset does not load "
                        "(with trust_remote_code and no package, and with the package; built on the meta device).")
    args = parser.parse_args(argv)
    if args.check:
        stale = check(args.out)
        for path in stale:
            print(f"stale or missing: {path}", file=sys.stderr)
        problems = [] if stale else check_loads(args.out)[0]
        for problem in problems:
            print(problem, file=sys.stderr)
        if not stale and not problems:
            print(f"{len(PRESETS)} presets up to date; each loads with trust_remote_code (package blocked) and with "
                  "the package, on the meta device")
        return 1 if stale or problems else 0
    for path in build(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
