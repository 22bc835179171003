"""Test helpers for the API server: a tiny checkpoint with a chat template, and ``biopetals-api`` as a process.

Module-scoped fixtures (import them into the test module): ``api_workdir`` and
``chat_checkpoint`` (the tiny checkpoint of ``support_models`` with a chat template).

``APIServer(model, swarm, *extra)`` starts ``python -m biopetals.api.cli`` on 127.0.0.1 with a
free port against a ``LocalSwarm``, waits for its ``READY http://...`` line and stops it
(SIGTERM, then SIGKILL) on ``close()``; its output goes to a log file (``output()``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support_models import make_tiny_checkpoint

__all__ = ["APIServer", "CHAT_TEMPLATE", "make_chat_checkpoint", "write_api_keys", "api_workdir", "chat_checkpoint"]

# A small ChatML-like template over the tiny tokenizer's special tokens.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def make_chat_checkpoint(path: str | os.PathLike) -> Path:
    """The tiny random Llama checkpoint of ``support_models``, its tokenizer given a chat template.

    Its context is 2048 tokens, so that a test can hold a generation open for seconds however
    fast the machine (``min_tokens``)."""
    from transformers import AutoTokenizer

    path = make_tiny_checkpoint(path, max_position_embeddings=2048)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def api_workdir(tmp_path_factory) -> Path:
    """A directory for the module's checkpoint, keys and server logs."""
    return tmp_path_factory.mktemp("api")


@pytest.fixture(scope="module")
def chat_checkpoint(api_workdir) -> Path:
    """The tiny checkpoint with a chat template, named ``tiny`` (its model name in the API)."""
    return make_chat_checkpoint(api_workdir / "tiny")


def write_api_keys(path: Path, *keys: str) -> Path:
    path.write_text("# API keys of the test server\n" + "\n".join(keys) + "\n")
    path.chmod(0o600)
    return path


class APIServer:
    def __init__(self, model: str | os.PathLike, swarm, *extra: str, log_dir: Path, timeout: float = 180.0) -> None:
        self.log_path = Path(log_dir) / f"api-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "biopetals.api.cli", "--model", str(model), "--swarm-key", str(swarm.key_path),
               "--initial-peers", *swarm.initial_peers, "--host", "127.0.0.1", "--port", "0", *extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self.url = ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if line.startswith("READY "):
                    self.url = line.split()[1]
                    return
            if self.process.poll() is not None:
                raise RuntimeError(f"biopetals-api exited with {self.process.returncode}:\n{self.output()}")
            time.sleep(0.1)
        self.close()
        raise RuntimeError(f"biopetals-api not READY within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, api_key: str = "none", **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kwargs)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self) -> "APIServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
