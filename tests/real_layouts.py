"""Offline stand-ins for published checkpoints: real vocabulary sizes, special-token ids and config fields.

No Hub here, so each family is a tiny random backbone (hidden 16, one or two layers) carrying the *published*
token layout: `config.json` ids, `generation_config.json` (EOS lists, pad, sampling defaults) and a tokenizer whose
special tokens sit at their real ids with the real `tokenizer_config` roles (bos/eos/pad/unk, BOS post-processor,
chat-template shape). Regular tokens are placeholder words `t<id>`; the first few regular ids are real words so
prompts read naturally.

Ids are those of the published files (Qwen/Qwen3-0.6B, the Qwen3.5 PIPO release, meta-llama/Llama-3.2-1B-Instruct,
mistralai/Mistral-7B-Instruct-v0.3, gpt2), written from the files' well-known contents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

WORDS = ["user", "assistant", "system", "The", "capital", "of", "France", "is", "hello", "world", "Paris", "a", "b"]
HIDDEN = 16


@dataclass
class Layout:
    """One published layout: backbone config fields, generation config, tokenizer specials and roles."""

    name: str
    model_type: str
    vocab_size: int  # embedding rows of the checkpoint
    n_regular: int  # ids [0, n_regular) are regular (BPE) tokens; specials come after (or inside, for GPT-2)
    specials: dict[int, str]  # id -> special token content
    config: dict  # config.json token fields (bos/eos/pad, tying)
    generation: dict  # generation_config.json
    roles: dict  # tokenizer_config roles: bos_token / eos_token / pad_token / unk_token (None = absent)
    add_bos: bool = False  # tokenizer post-processor prepends BOS (Llama, Mistral)
    chat_template: str | None = None
    shape: dict = field(default_factory=dict)  # extra model-shape fields

    # expectations after `from_backbone(path, tokenizer=tok)`
    expect_pad: int = -1
    expect_generation_eos: list[int] = field(default_factory=list)
    expect_vocab: int = -1
    expect_warning: bool = False


QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
LLAMA_CHAT = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|> {{ m['content'] }}<|eot_id|> "
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|> {% endif %}"
)
MISTRAL_CHAT = "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}" \
    " {{ m['content'] }}</s>{% endif %}{% endfor %}"

_QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                   "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                   "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                   "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                   "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
_LLAMA_NAMED = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
                128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
                128010: "<|python_tag|>"}


def _llama_specials() -> dict[int, str]:
    specials, reserved = {}, 0
    for i in range(128000, 128256):
        if i in _LLAMA_NAMED:
            specials[i] = _LLAMA_NAMED[i]
        else:
            specials[i] = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
    return specials


LAYOUTS: dict[str, Layout] = {
    # Qwen/Qwen3-0.6B: config eos <|im_end|>; generation_config eos [<|im_end|>, <|endoftext|>], pad <|endoftext|>.
    "qwen3": Layout(
        "qwen3", "qwen3", 151936, 151643, {151643 + i: t for i, t in enumerate(_QWEN3_SPECIALS)},
        config={"bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": True},
        generation={"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                    "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95},
        roles={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None},
        chat_template=QWEN_CHAT, shape={"head_dim": 8},
        expect_pad=151643, expect_generation_eos=[151645], expect_vocab=151936, expect_warning=True,
    ),
    # The Qwen3.5 PIPO release (text backbone): the authors' PAD <|endoftext|> 248044 is the config's EOS and in the
    # generation EOS list; the tokenizer has no BOS, eos <|im_end|> 248046, pad <|endoftext|>.
    "qwen3_5": Layout(
        "qwen3_5", "qwen3_5_text", 248320, 248044,
        {248044 + i: t for i, t in enumerate(_QWEN3_SPECIALS)},
        config={"eos_token_id": 248044, "pad_token_id": 248044, "tie_word_embeddings": True},
        generation={"do_sample": True, "eos_token_id": [248046, 248044], "pad_token_id": 248044,
                    "temperature": 1.0, "top_k": 20, "top_p": 0.95},
        roles={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None},
        chat_template=QWEN_CHAT,
        shape={"head_dim": 8, "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"],
               "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 8,
               "linear_value_head_dim": 8},
        expect_pad=248044, expect_generation_eos=[248046], expect_vocab=248320, expect_warning=True,
    ),
    # meta-llama/Llama-3.2-1B-Instruct: no pad anywhere; an EOS list of three; BOS prepended by the tokenizer.
    "llama": Layout(
        "llama", "llama", 128256, 128000, _llama_specials(),
        config={"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": True},
        generation={"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
                    "temperature": 0.6, "top_p": 0.9},
        roles={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": None, "unk_token": None},
        add_bos=True, chat_template=LLAMA_CHAT,
        expect_pad=128256, expect_generation_eos=[128001, 128008, 128009], expect_vocab=128257,
    ),
    # mistralai/Mistral-7B-Instruct-v0.3: <unk>=0, <s>=1, </s>=2, control tokens after; no pad.
    "mistral": Layout(
        "mistral", "mistral", 32768, 32768,
        {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[TOOL_CALLS]", 6: "[AVAILABLE_TOOLS]",
         7: "[/AVAILABLE_TOOLS]", 8: "[TOOL_RESULTS]", 9: "[/TOOL_RESULTS]"},
        config={"bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "sliding_window": None},
        generation={"bos_token_id": 1, "eos_token_id": 2},
        roles={"bos_token": "<s>", "eos_token": "</s>", "pad_token": None, "unk_token": "<unk>"},
        add_bos=True, chat_template=MISTRAL_CHAT,
        expect_pad=32768, expect_generation_eos=[2], expect_vocab=32769,
    ),
    # gpt2: bos = eos = unk = <|endoftext|> 50256 (the last regular id); no pad, no chat template.
    "gpt2": Layout(
        "gpt2", "gpt2", 50257, 50257, {50256: "<|endoftext|>"},
        config={"bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True},
        generation={"bos_token_id": 50256, "eos_token_id": 50256},
        roles={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": None,
               "unk_token": "<|endoftext|>"},
        expect_pad=50257, expect_generation_eos=[50256], expect_vocab=50258,
    ),
}


def build_tokenizer(layout: Layout) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with the layout's vocabulary size and its special tokens at their real ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab: dict[str, int] = {}
    regular = [i for i in range(layout.n_regular) if i not in layout.specials]
    for k, i in enumerate(regular):
        vocab[WORDS[k] if k < len(WORDS) else f"t{i}"] = i
    for i, content in layout.specials.items():
        vocab[content] = i
    unk = layout.roles.get("unk_token")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk or "t20"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for _, c in sorted(layout.specials.items())])
    if layout.add_bos:
        bos = layout.roles["bos_token"]
        bos_id = next(i for i, c in layout.specials.items() if c == bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    roles = {k: v for k, v in layout.roles.items() if v is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **roles)
    if layout.chat_template:
        fast.chat_template = layout.chat_template
    for i, content in layout.specials.items():
        assert fast.convert_tokens_to_ids(content) == i, (layout.name, content, i)
    return fast


def build_backbone(layout: Layout, seed: int = 0):
    """A tiny random backbone with the layout's vocabulary and token fields, and its generation config."""
    kwargs = dict(vocab_size=layout.vocab_size, **layout.config)
    if layout.model_type == "gpt2":
        kwargs.update(n_embd=HIDDEN, n_layer=1, n_head=2, n_positions=512)
    else:
        kwargs.update(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1)
    kwargs.update(layout.shape)
    config = AutoConfig.for_model(layout.model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(**layout.generation)
    return model


def write_standin(layout: Layout, folder: Path) -> Path:
    """Save the backbone, its generation_config.json and the tokenizer files into `folder` (like a Hub snapshot)."""
    folder = Path(folder)
    model = build_backbone(layout)
    model.save_pretrained(folder)
    # the published generation_config.json, exactly (save_pretrained may add fields of its own)
    (folder / "generation_config.json").write_text(json.dumps(layout.generation, indent=2))
    build_tokenizer(layout).save_pretrained(folder)
    return folder
