"""Shared test fixtures: tiny random backbones of every supported family and an offline tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.qwen3_5 import Qwen3_5TextConfig

# Tiny models run faster single-threaded, and CI shares two cores.
torch.set_num_threads(1)

VOCAB = 128
PAD_ID = VOCAB - 1
EOS_ID = 2
BOS_ID = 1


def tiny_backbone_config(family: str, vocab_size: int = VOCAB, hidden: int = 32, layers: int = 2):
    """A tiny random config of one backbone family (ids: bos=1, eos=2; PAD is left to PIPO)."""
    common = dict(vocab_size=vocab_size, eos_token_id=EOS_ID, bos_token_id=BOS_ID)
    attn = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2)
    if family == "llama":
        return LlamaConfig(**common, **attn)
    if family == "mistral":
        return MistralConfig(**common, **attn, sliding_window=4)
    if family == "qwen2":
        return Qwen2Config(**common, **attn)
    if family == "qwen3":
        return Qwen3Config(**common, **attn, head_dim=hidden // 4, tie_word_embeddings=True)
    if family == "qwen3_5":
        return Qwen3_5TextConfig(
            **common, **{**attn, "num_hidden_layers": max(layers, 4)}, head_dim=hidden // 4,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
        )
    if family == "gpt2":
        return GPT2Config(**common, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256)
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_5", "gpt2"]


def tiny_pipo(family: str = "qwen3", seed: int = 0, compressor_type: str = "mlp", **kwargs):
    """A PIPO model converted from a tiny random backbone (PAD = VOCAB - 1), in eval mode."""
    from transformers_pipo import PipoForCausalLM

    torch.manual_seed(seed)
    backbone = AutoModelForCausalLM.from_config(tiny_backbone_config(family))
    model = PipoForCausalLM.from_backbone(backbone, pad_token_id=PAD_ID, compressor_type=compressor_type, **kwargs)
    return model.eval()


def make_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline: words `w3..w{V-2}`, specials <unk>=0, <s>=1, </s>=2, no PAD."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": BOS_ID, "</s>": EOS_ID}
    for i in range(3, vocab_size - 1):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}w3{% endif %}"
    )
    return fast


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()
