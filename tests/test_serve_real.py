"""`aft-graph serve --model small`: a real server process, a real vLLM engine, the `openai` client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parent.parent
MAX_MODEL_LEN = 2048


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


QUESTION = [{"role": "user", "content": "What is 12 + 7? Put the final answer in \\boxed{}."}]


@pytest.fixture(scope="module")
def aft_server(small_model_dir, tmp_path_factory):
    """`aft-graph serve --model small` on a free port; yields its base URL."""
    pytest.importorskip("vllm")
    pytest.importorskip("uvicorn")
    port = _free_port()
    cmd = [
        sys.executable, "-m", "aft_graph.cli", "serve", "--model", str(small_model_dir),
        "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN), "--max-tokens", "48",
        "--max-concurrency", "2", "--verbose",  # the log (kept in the tmp dir) tells what went wrong
    ]  # fmt: skip
    log_path = tmp_path_factory.mktemp("aft-serve") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT)}
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"aft-graph serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"aft-graph serve not up after 600 s; log: {log_path}"
                time.sleep(1)
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def _status(url: str) -> dict:
    return httpx.get(f"{url}/status", timeout=10).json()


def _wait(predicate, timeout: float, what: str, url: str | None = None) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what} not reached within {timeout} s (status: {url and _status(url)})")
        time.sleep(0.1)
    return time.monotonic() - start


def test_openai_client_gets_a_completion_whose_usage_counts_every_call(aft_server):
    client = openai.OpenAI(base_url=f"{aft_server}/v1", api_key="unused")
    assert "aft-k4-l2" in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(
        model="aft-k2-l1", messages=QUESTION, max_tokens=32, temperature=0.7, seed=1
    )
    (choice,) = reply.choices
    assert choice.message.content.strip() and choice.finish_reason in ("stop", "length")
    (run,) = reply.model_extra["aft"]
    assert run["usage"]["calls"] == 2 + 2  # K=2 proposals + 2 aggregations
    layers = run["layers"]
    assert reply.usage.completion_tokens == sum(sum(ly["completion_tokens"]) for ly in layers)
    assert reply.usage.prompt_tokens == sum(sum(ly["prompt_tokens"]) for ly in layers)
    # every call is counted: far more than the returned text alone
    assert reply.usage.completion_tokens > max(layers[-1]["completion_tokens"])
    assert all(t <= 32 for ly in layers for t in ly["completion_tokens"])


def test_stream_yields_layer_events_before_the_answer(aft_server):
    client = openai.OpenAI(base_url=f"{aft_server}/v1", api_key="unused")
    order, layers, content = [], [], ""
    for chunk in client.chat.completions.create(
        model="aft-k2-l1", messages=QUESTION, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
    ):  # fmt: skip
        if "aft_layer" in (chunk.model_extra or {}):
            order.append("layer")
            layers.append(chunk.model_extra["aft_layer"])
        elif chunk.choices and chunk.choices[0].delta.content:
            order.append("content")
            content += chunk.choices[0].delta.content
        elif chunk.usage is not None:
            order.append("usage")
    assert order == ["layer", "layer", "content", "usage"]
    assert [(ev["layer"], ev["kind"], len(ev["texts"])) for ev in layers] == [
        (0, "proposals", 2),
        (1, "aggregation", 2),
    ]
    assert content in layers[-1]["texts"]


def test_disconnect_cancels_the_run_and_aborts_the_engine_requests(aft_server):
    before = _status(aft_server)
    busy = lambda: (_status(aft_server)["engine_requests"] or 0) > 0  # noqa: E731
    idle = lambda: _status(aft_server)["engine_requests"] == 0  # noqa: E731
    # Long generations (max_tokens=400, temperature 1): the proposals are still in the engine
    # when the client hangs up.
    body = {"model": "aft-k2-l3", "messages": QUESTION, "max_tokens": 400, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", f"{aft_server}/v1/chat/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        assert '"role": "assistant"' in next(line for line in lines if line.startswith("data:"))
        _wait(busy, 60, "proposal requests in the engine", aft_server)
    # hung up mid-layer: the run is cancelled and the engine's requests are aborted
    took = _wait(idle, 30, "engine requests aborted", aft_server)
    after = _status(aft_server)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"] and after["in_flight"] == 0
    assert took < 10

    # Same for a plain (non-streamed) request: hang up the socket while the engine generates.
    payload = json.dumps({**body, "stream": False}).encode()
    host, port = aft_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
        )
        _wait(busy, 60, "proposal requests in the engine", aft_server)
    _wait(idle, 30, "engine requests aborted", aft_server)
    final = _status(aft_server)
    assert final["cancelled"] == before["cancelled"] + 2 and final["completed"] == before["completed"]
