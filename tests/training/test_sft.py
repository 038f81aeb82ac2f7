"""PIPO SFT on the tiny pattern task: the three losses fall, greedy PIPO decoding reproduces the pattern, and the
confidence head separates right from wrong drafts; plus loss weighting, trainable groups and checkpoint reloads."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipo_task import PAD_ID, auroc, eval_losses, is_legal, pad_tokenizer, pattern_pipo, pattern_records
from transformers_pipo.training import PipoDataCollator, PipoSFTConfig, PipoSFTTrainer

STEPS = 150


def sft_args(output_dir, **overrides):
    base = dict(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=16, learning_rate=3e-3,
        warmup_steps=10, lr_scheduler_type="constant_with_warmup", logging_steps=25, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    base.update(overrides)
    return PipoSFTConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    model = pattern_pipo(seed=0)
    held_out = pattern_records(64, seed=2)
    plain = PipoDataCollator(pad_token_id=PAD_ID, max_pad_ratio=0.0)
    before = eval_losses(model, plain, held_out)
    trainer = PipoSFTTrainer(
        model=model, args=sft_args(tmp_path_factory.mktemp("sft")), train_dataset=pattern_records(2400, seed=1),
        processing_class=pad_tokenizer(),
    )
    trainer.train()
    model.eval()
    after = eval_losses(model, plain, held_out)
    print(f"\nSFT held-out losses before {before}\nafter {after}")
    return {"model": model, "trainer": trainer, "before": before, "after": after, "held_out": held_out}


def test_sft_lowers_all_three_losses(trained):
    before, after = trained["before"], trained["after"]
    for name in ("backbone_loss", "mtp_loss", "confidence_loss"):
        assert after[name] < before[name], name
    # The pattern is deterministic except one fair branch per period: the CE floor is about ln2/6 ≈ 0.12.
    assert after["backbone_loss"] < 0.3 and after["mtp_loss"] < 0.3
    history = trained["trainer"].state.log_history
    logged = [h for h in history if "backbone_loss" in h]
    assert logged and all(k in logged[0] for k in ("loss", "mtp_loss", "confidence_loss", "mean_confidence",
                                                    "pad_fraction"))
    assert logged[-1]["backbone_loss"] < logged[0]["backbone_loss"]
    assert 0.0 < logged[0]["pad_fraction"] < 0.5  # PAD augmentation was active


def test_greedy_pipo_generation_reproduces_the_pattern(trained):
    model = trained["model"]
    prompts = [r["prompt_ids"] for r in trained["held_out"][:8]]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16, pad_token_id=PAD_ID,
                         pipo_confidence_threshold=-1.0, return_dict_in_generate=True)
    for b, prompt in enumerate(prompts):
        generated = out.sequences[b, width:].tolist()
        assert len(generated) == 16
        previous = prompt[-1]
        for token in generated:
            assert is_legal(previous, token), (prompt, generated)
            previous = token
    # τ < 0 commits every draft: two tokens per backbone step after the prefill.
    assert torch.equal(out.committed_drafts, out.decode_steps)


def test_confidence_head_separates_right_from_wrong_drafts(trained):
    model, held_out = trained["model"], trained["held_out"]
    batch = PipoDataCollator(pad_token_id=PAD_ID, max_pad_ratio=0.0)(held_out)
    with torch.no_grad():
        out = model(**batch)
    targets = out.pair_labels[:, 3::2]
    valid = targets != -100
    right = (out.mtp_logits.argmax(-1) == targets)[valid]
    score = torch.sigmoid(out.confidence_logits)[valid]
    value = auroc(score, right)
    print(f"\nheld-out drafts: {int(valid.sum())}, accuracy {right.float().mean():.3f}, confidence AUROC {value:.3f}")
    assert 0 < int((~right).sum()) and value >= 0.8


def test_saved_checkpoint_is_a_loadable_pipo_folder(trained, tmp_path):
    trainer, model = trained["trainer"], trained["model"]
    trainer.save_model(str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(loaded).__name__ == "PipoForCausalLM"
    batch = PipoDataCollator(pad_token_id=PAD_ID, max_pad_ratio=0.0)(trained["held_out"][:4])
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.confidence_logits, b.confidence_logits)
    assert (tmp_path / "tokenizer_config.json").exists()


def test_loss_weights_come_from_the_config(tmp_path):
    model = pattern_pipo(seed=3)
    records = pattern_records(4, seed=4)
    args = sft_args(tmp_path, max_steps=1, mtp_loss_weight=0.0, confidence_loss_weight=2.0, max_pad_ratio=0.0)
    trainer = PipoSFTTrainer(model=model, args=args, train_dataset=records, processing_class=pad_tokenizer())
    batch = trainer.data_collator(records)
    model.eval()
    with torch.no_grad():
        loss, out = trainer.compute_loss(model, batch, return_outputs=True)
    assert loss.item() == pytest.approx((out.backbone_loss + 2.0 * out.confidence_loss).item(), rel=1e-6)
    assert model.config.mtp_loss_weight == 0.0 and model.config.confidence_loss_weight == 2.0  # one place: config
    assert trainer.model_accepts_loss_kwargs  # Trainer passes num_items_in_batch and does not rescale the loss
    metrics = trainer.evaluate(eval_dataset=records)
    assert {"eval_loss", "eval_backbone_loss", "eval_mtp_loss", "eval_confidence_loss"} <= set(metrics)


@pytest.mark.parametrize("mode", ["full", "heads"])
def test_trainable_groups(tmp_path, mode):
    model = pattern_pipo(seed=5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    args = sft_args(tmp_path, max_steps=2, train_mode=mode, learning_rate=1e-2, warmup_steps=0)
    trainer = PipoSFTTrainer(model=model, args=args, train_dataset=pattern_records(32, seed=6),
                             processing_class=pad_tokenizer())
    trainer.train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    assert "model.backbone.embed_tokens.weight" not in changed and "lm_head.weight" not in changed  # always frozen
    assert any(k.startswith("model.compressor.") for k in changed) and any(k.startswith("model.mtp.") for k in changed)
    assert any(k.startswith("model.confidence_head.") for k in changed)
    backbone_changed = any(k.startswith("model.backbone.layers.") for k in changed)
    assert backbone_changed == (mode == "full")


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="train_mode"):
        sft_args(tmp_path, train_mode="partial")
    with pytest.raises(ValueError, match="pad_augmentation"):
        sft_args(tmp_path, pad_augmentation="random")
    with pytest.raises(ValueError, match="PIPO model"):
        from conftest import tiny_backbone_config

        PipoSFTTrainer(model=AutoModelForCausalLM.from_config(tiny_backbone_config("qwen3")), args=sft_args(tmp_path))


def test_sft_gradient_accumulation_equals_one_big_batch(tmp_path):
    """The PIPO trainer uses the model's loss with `num_items_in_batch`: 2 accumulation steps of 4 rows update the
    parameters like one step over the 8 rows (SGD, no clipping, no PAD augmentation)."""
    records = pattern_records(8, seed=9)
    states = []
    for batch, accumulation in ((8, 1), (4, 2)):
        model = pattern_pipo(seed=3)
        args = sft_args(tmp_path / f"ga{accumulation}", max_steps=1, per_device_train_batch_size=batch,
                        gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5, warmup_steps=0,
                        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, max_pad_ratio=0.0)
        PipoSFTTrainer(model=model, args=args, train_dataset=records, processing_class=pad_tokenizer()).train()
        states.append({k: v.detach().clone() for k, v in model.named_parameters()})
    start = dict(pattern_pipo(seed=3).named_parameters())
    for name, big in states[0].items():
        torch.testing.assert_close(states[1][name] - start[name], big - start[name], rtol=1e-4, atol=1e-6, msg=name)
