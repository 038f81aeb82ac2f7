"""Model cards: save_pretrained and push_to_hub write a PIPO README.md; push_to_hub goes through huggingface_hub.

The Hub is never contacted: `HfApi.create_repo` / `HfApi.create_commit` and `ModelCard.load` are replaced, so the
upload test stops exactly at the commit call and inspects what would have been uploaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError

from conftest import tiny_pipo
from transformers_pipo.modelcard_pipo import CARD_MARKER, build_model_card


@pytest.fixture(scope="module")
def model():
    m = tiny_pipo("qwen3", compressor_type="linear")
    m.config.backbone_config._name_or_path = "Qwen/Qwen3-0.6B"  # as after from_backbone("Qwen/Qwen3-0.6B")
    m.generation_config.pipo_confidence_threshold = 0.9
    return m


def read_card(folder) -> str:
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as handle:
        return handle.read()


def test_save_pretrained_writes_card(model, tmp_path):
    out = tmp_path / "my-pipo"
    model.save_pretrained(out)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "Qwen/Qwen3-0.6B"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "pipo" in card.data.tags and "custom_code" in card.data.tags
    text = card.text
    assert CARD_MARKER in text
    assert "| Compressor | `linear` |" in text
    assert "| Confidence threshold τ | 0.9:" in text
    assert "| Training stages | not recorded |" in text
    assert "| Measured commit rate | not measured |" in text
    assert 'AutoModelForCausalLM.from_pretrained("my-pipo", trust_remote_code=True)' in text
    # the card module travels with the remote code
    assert (out / "modelcard_pipo.py").is_file() and (out / "modeling_pipo.py").is_file()


def test_card_fields_from_attribute_and_call(model, tmp_path):
    model.pipo_model_card_info = {"training_stages": ["SFT (LoRA r=64)", "OPD τ=0.95"], "license": "apache-2.0"}
    try:
        model.save_pretrained(
            tmp_path, model_card={"commit_rate": 0.625, "commit_rate_setting": "GSM8K, τ=0.9, greedy",
                                  "repo_id": "me/qwen3-pipo", "datasets": ["openai/gsm8k"]}
        )
    finally:
        del model.pipo_model_card_info
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "apache-2.0" and card.data.datasets == ["openai/gsm8k"]
    assert "| Training stages | 1. SFT (LoRA r=64); 2. OPD τ=0.95 |" in card.text
    assert "| Measured commit rate | 62.5% (GSM8K, τ=0.9, greedy) |" in card.text
    assert 'from_pretrained("me/qwen3-pipo", trust_remote_code=True)' in card.text


def test_user_readme_is_kept_and_own_card_is_refreshed(model, tmp_path):
    (tmp_path / "README.md").write_text("# my own notes\n")
    model.save_pretrained(tmp_path)
    assert read_card(tmp_path) == "# my own notes\n"

    other = tmp_path / "b"
    model.save_pretrained(other)
    assert "| Confidence threshold τ | 0.9:" in read_card(other)
    model.generation_config.pipo_confidence_threshold = -1.0
    try:
        model.save_pretrained(other)
    finally:
        model.generation_config.pipo_confidence_threshold = 0.9
    assert "| Confidence threshold τ | -1: every draft is committed (no gating) |" in read_card(other)


def test_no_card_when_disabled_and_unknown_fields_are_named(model, tmp_path):
    model.save_pretrained(tmp_path / "a", model_card=False)
    assert not (tmp_path / "a" / "README.md").exists()
    with pytest.raises(ValueError, match=r"Unknown model card field\(s\) \['comit_rate'\]"):
        build_model_card(model, {"comit_rate": 0.5})


def _fake_hub(monkeypatch):
    """Replace the three Hub calls of an upload; return the list that collects each commit's files."""
    commits = []

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        files = {}
        for op in operations:
            with open(op.path_or_fileobj, "rb") as handle:  # the temporary folder still exists here
                files[op.path_in_repo] = handle.read()
        commits.append({"repo_id": repo_id, "message": commit_message, "files": files})
        return "committed"

    def load(cls, *args, **kwargs):
        raise EntryNotFoundError("README.md not found (new repo)")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", classmethod(load))
    return commits


def test_push_to_hub_uploads_the_pipo_card(model, monkeypatch):
    commits = _fake_hub(monkeypatch)
    assert model.push_to_hub("me/tiny-pipo") == "committed"
    (commit,) = commits
    assert commit["repo_id"] == "me/tiny-pipo"
    files = commit["files"]
    assert {"config.json", "model.safetensors", "modeling_pipo.py", "modelcard_pipo.py", "README.md"} <= set(files)
    readme = files["README.md"].decode()
    assert CARD_MARKER in readme and "automatically generated" not in readme
    assert 'from_pretrained("me/tiny-pipo", trust_remote_code=True)' in readme
    assert "base_model: Qwen/Qwen3-0.6B" in readme
    assert json.loads(files["config.json"])["auto_map"]["AutoModelForCausalLM"] == "modeling_pipo.PipoForCausalLM"


def test_save_pretrained_push_to_hub_path(model, monkeypatch, tmp_path):
    commits = _fake_hub(monkeypatch)
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/other")
    (commit,) = commits
    assert 'from_pretrained("me/other", trust_remote_code=True)' in commit["files"]["README.md"].decode()


def test_saved_folder_loads_as_remote_code_without_the_package(model, tmp_path):
    model.save_pretrained(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert "transformers_pipo" not in sys.modules, "the package must not be needed"
        print(type(m).__name__, type(m).__module__.split(".")[-1])
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["PipoForCausalLM", "modeling_pipo"]


def test_a_local_base_path_never_appears(model, tmp_path):
    local = tmp_path / "my-checkpoints" / "qwen3-base"
    local.mkdir(parents=True)
    model.config.backbone_config._name_or_path = str(local)  # as after from_backbone("/home/me/.../qwen3-base")
    try:
        card = build_model_card(model, {"training_stages": ["SFT (full, 10 steps)"]})
    finally:
        model.config.backbone_config._name_or_path = "Qwen/Qwen3-0.6B"
    assert str(local) not in card and "my-checkpoints" not in card
    assert "| Base model | a local checkpoint (not on the Hub) |" in card
    assert "base_model:" not in card.split("---")[1]


def test_training_stages_recorded_in_the_config_reach_the_card(model, tmp_path):
    model.config.pipo_training_stages = ["SFT (full, 10 steps)", "OPD (full, 5 steps)"]
    try:
        model.save_pretrained(tmp_path / "m")
    finally:
        del model.config.pipo_training_stages
    assert "| Training stages | 1. SFT (full, 10 steps); 2. OPD (full, 5 steps) |" in read_card(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["pipo_training_stages"][1] == "OPD (full, 5 steps)"
