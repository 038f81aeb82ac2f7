"""PipoConfig: nested backbone config, tying mirror, serialisation, and validation errors that name the problem."""

from __future__ import annotations

import pytest
from conftest import EOS_ID, FAMILIES, PAD_ID, VOCAB, tiny_backbone_config
from transformers import AutoConfig, BertConfig, T5Config

from transformers_pipo import PipoConfig


def make_config(family: str = "qwen3", **kwargs) -> PipoConfig:
    kwargs.setdefault("pad_token_id", PAD_ID)
    return PipoConfig(backbone_config=tiny_backbone_config(family), **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_rebuilds_backbone_class(family, tmp_path):
    config = make_config(family, compressor_type="linear", mtp_loss_weight=0.5, loss_chunk_size=64)
    backbone_cls = type(tiny_backbone_config(family))
    assert type(config.backbone_config) is backbone_cls
    assert config.get_text_config() is config.backbone_config
    assert config.get_text_config(decoder=True) is config.backbone_config

    from_dict = PipoConfig.from_dict(config.to_dict())
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)  # registered by importing transformers_pipo
    for other in (from_dict, loaded):
        assert other.model_type == "pipo"
        assert type(other.backbone_config) is backbone_cls
        assert other.backbone_config.to_dict() == config.backbone_config.to_dict()
        assert (other.compressor_type, other.pad_token_id, other.mtp_loss_weight, other.loss_chunk_size) == (
            "linear", PAD_ID, 0.5, 64)
        assert other.hidden_size == config.hidden_size == 32
        assert other.vocab_size == VOCAB


@pytest.mark.parametrize(("family", "tied"), [("qwen3", True), ("gpt2", True), ("llama", False), ("mistral", False)])
def test_tie_word_embeddings_mirrors_backbone(family, tied):
    assert make_config(family).tie_word_embeddings is tied


def test_composite_backbone_reduced_to_text_config():
    from transformers.models.qwen3_5 import Qwen3_5Config, Qwen3_5TextConfig

    text = tiny_backbone_config("qwen3_5")
    config = PipoConfig(backbone_config=Qwen3_5Config(text_config=text.to_dict()), pad_token_id=PAD_ID)
    assert type(config.backbone_config) is Qwen3_5TextConfig
    assert config.backbone_config.hidden_size == text.hidden_size


def test_eos_token_ids_normalised():
    assert make_config().eos_token_ids == [EOS_ID]
    config = PipoConfig(backbone_config=tiny_backbone_config("llama").to_dict() | {"eos_token_id": [2, 5]},
                        pad_token_id=PAD_ID)
    assert config.eos_token_ids == [2, 5]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pad_token_id": EOS_ID}, r"pad_token_id=2 equals an EOS id"),
        ({"pad_token_id": VOCAB}, r"pad_token_id=128 is outside the backbone vocabulary"),
        ({"pad_token_id": -1}, r"pad_token_id=-1 is outside the backbone vocabulary"),
        ({"compressor_type": "conv"}, r"compressor_type must be one of .*'conv'"),
        ({"num_mtp_layers": 0}, r"num_mtp_layers must be 1.*got 0"),
        ({"num_mtp_layers": 2}, r"num_mtp_layers must be 1.*got 2"),
        ({"mtp_init": "copy"}, r"mtp_init must be one of .*'copy'"),
        ({"mtp_fc_init": "eye"}, r"mtp_fc_init must be one of .*'eye'"),
        ({"norm_style": "rms"}, r"norm_style must be one of .*'rms'"),
        ({"loss_chunk_size": 0}, r"loss_chunk_size must be positive"),
        ({"confidence_hidden_size": 0}, r"confidence_hidden_size must be positive"),
    ],
)
def test_invalid_fields_raise_named_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_config(**kwargs)


def test_pad_equal_to_any_eos_in_a_list_is_rejected():
    backbone = tiny_backbone_config("llama").to_dict() | {"eos_token_id": [2, 9]}
    with pytest.raises(ValueError, match=r"pad_token_id=9 equals an EOS id"):
        PipoConfig(backbone_config=backbone, pad_token_id=9)


def test_encoder_decoder_backbone_rejected():
    with pytest.raises(ValueError, match=r"decoder-only backbone.*encoder-decoder model_type 't5'"):
        PipoConfig(backbone_config=T5Config(vocab_size=64), pad_token_id=5)
    with pytest.raises(ValueError, match=r"encoder-decoder model_type 't5'"):
        PipoConfig(backbone_config=T5Config(vocab_size=64).to_dict(), pad_token_id=5)


def test_encoder_only_backbone_rejected():
    with pytest.raises(ValueError, match=r"'bert' is a bidirectional encoder"):
        PipoConfig(backbone_config=BertConfig(vocab_size=64), pad_token_id=5)


def test_missing_pad_is_allowed_in_config_but_required_on_use():
    config = make_config(pad_token_id=None)
    assert config.pad_token_id is None
    with pytest.raises(ValueError, match=r"pad_token_id is required"):
        config.require_pad_token()
