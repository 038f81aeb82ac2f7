"""LoRA through peft: adapter save -> reload -> identical generation, merge_and_unload -> identical generation, and a
LoRA OPD step (peft wrapping by the trainer, as in SFT)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from pipo_task import PAD_ID, pad_tokenizer, pattern_pipo, pattern_records, train_pattern_teacher
from transformers_pipo.training import PipoSFTConfig, PipoSFTTrainer, save_merged


def generate(model, tau=0.5):
    prompts = torch.tensor([[1, 5, 10, 11], [PAD_ID, 1, 5, 12]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    model.eval()
    out = model.generate(prompts, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=PAD_ID,
                         pipo_confidence_threshold=tau, return_dict_in_generate=True)
    return out.sequences, out.pipo_slot_ids


def teacher_forced(model):
    ids = torch.tensor([[1, 5, 10, 11, 12, 13, 15, 16, 10, 11]])
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits, out.mtp_logits, out.confidence_logits


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora")
    tok = pad_tokenizer()
    pattern_pipo(seed=0).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    args = PipoSFTConfig(
        output_dir=str(root / "run"), max_steps=20, per_device_train_batch_size=8, learning_rate=1e-2,
        train_mode="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0, logging_steps=10,
    )
    trainer = PipoSFTTrainer(model=base, args=args, train_dataset=pattern_records(160, seed=1), processing_class=tok)
    trainer.train()
    trainer.save_model(str(root / "adapter"))
    return {"root": root, "trainer": trainer, "model": trainer.model}


def test_lora_wraps_the_right_modules(lora_run):
    model = lora_run["model"]
    assert isinstance(model, PeftModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("mtp.layers.0.self_attn.q_proj.lora_A" in n for n in trainable)  # MTP layer adapted by suffix
    assert any("model.backbone.layers.0.mlp.down_proj.lora_B" in n for n in trainable)
    for name in ("compressor", "confidence_head", "mtp.fc", "mtp.norm"):
        assert any(f"{name}.modules_to_save" in n for n in trainable), name
    assert not any("embed_tokens" in n or "lm_head" in n for n in trainable)
    config = json.loads((lora_run["root"] / "adapter" / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) >= {"compressor", "confidence_head", "mtp.fc"}
    with safe_open(lora_run["root"] / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("base_model.model.model.compressor.") for k in keys)
    assert any("lora_A" in k for k in keys)
    lora_b = [k for k in keys if "lora_B" in k]
    with safe_open(lora_run["root"] / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert any(f.get_tensor(k).abs().max() > 0 for k in lora_b), "training moved the adapters"


def test_adapter_reload_and_merge_give_identical_generation(lora_run):
    root, model = lora_run["root"], lora_run["model"]
    expected = generate(model)
    expected_logits = teacher_forced(model)

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "adapter")
    for a, b in zip(generate(reloaded), expected):
        assert torch.equal(a, b)
    for a, b in zip(teacher_forced(reloaded), expected_logits):
        torch.testing.assert_close(a, b)

    merged = save_merged(reloaded, str(root / "merged"), pad_tokenizer())
    assert type(merged).__name__ == "PipoForCausalLM"
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    for a, b in zip(generate(merged), expected):
        assert torch.equal(a, b)
    loaded = AutoModelForCausalLM.from_pretrained(root / "merged")
    for a, b in zip(generate(loaded), expected):
        assert torch.equal(a, b)
    for a, b in zip(teacher_forced(loaded), expected_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_lora_opd_step(tmp_path):
    from transformers_pipo import PipoOPDConfig, PipoOPDTrainer

    teacher = train_pattern_teacher(steps=5)
    student = pattern_pipo(seed=1)
    args = PipoOPDConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, train_mode="lora", lora_r=4,
        lora_alpha=8, max_new_tokens=6, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        divergence="sampled", logging_steps=1,
    )
    prompts = [{"prompt_ids": r["prompt_ids"]} for r in pattern_records(4, seed=2)]
    calls = []

    def rollout(model, input_ids, **kwargs):  # the hook for an external rollout engine
        calls.append(kwargs["pipo_confidence_threshold"])
        return model.generate(input_ids, **kwargs)

    trainer = PipoOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                             eval_dataset=prompts[:2], processing_class=pad_tokenizer(), rollout_fn=rollout)
    assert isinstance(trainer.model, PeftModel)
    trainer.train()
    assert trainer.state.global_step == 2 and calls == [0.95, 0.95]
    assert "rollout_commit_rate" in trainer.state.log_history[0]
    metrics = trainer.evaluate()  # one on-policy rollout per eval batch + the OPD loss
    assert {"eval_loss", "eval_divergence_backbone", "eval_alpha_mean", "eval_rollout_length"} <= set(metrics)
