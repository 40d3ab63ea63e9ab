"""Reliability on the real stack (small model, CPU): timed-out calls aborted in vLLM, 32 concurrent
questions through one engine, the engine process killed mid-run, an unclosed engine at exit, and
a `vllm serve` restarted mid-run. Slow: each test starts what it kills (engines, servers).

Run them under the shared lock: ``flock /tmp/aft-heavy.lock python -m pytest -m slow
tests/test_reliability_real.py``. docs/reliability.md records what they measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from aft_graph import AggregateConfig, LayerFailedError, SamplingConfig, build_graph
from aft_graph.backends import BackendUnavailableError, GenerationRequest, Sampling

pytestmark = [pytest.mark.slow]

MAX_MODEL_LEN = 2048


class Spy:
    """Wraps a backend: counts requests in flight (all, and per question tag ``Q[..]``)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.in_flight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.total = 0
        self.peak_total = 0
        self.seen: list[tuple[str, GenerationRequest, str | None]] = []
        self.unavailable = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    async def generate(self, request: GenerationRequest):
        tag = re.search(r"Q\[(\w+)\]", request.messages[-1]["content"]).group(1)
        self.in_flight[tag] += 1
        self.total += 1
        self.peak[tag] = max(self.peak[tag], self.in_flight[tag])
        self.peak_total = max(self.peak_total, self.total)
        try:
            out = await self.backend.generate(request)
        except BackendUnavailableError:
            self.unavailable += 1
            raise
        finally:
            self.in_flight[tag] -= 1
            self.total -= 1
        self.seen.append((tag, request, out[0].text if out else None))
        return out


_RESPONSE = re.compile(r'<response id="\d+">\n(.*?)\n</response>', re.DOTALL)


def _is_aggregation(request: GenerationRequest) -> bool:
    return "<response id=" in request.messages[-1]["content"]


def _rss_mib() -> float:
    """Resident memory of this process and its children (the engine core), MiB."""
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):  # a child that just ended
            total += p.memory_info().rss
    return total / 2**20


def _engine_cores() -> list[Any]:
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            label = child.name() + " " + " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "EngineCore" in label:
            found.append(child)
    return found


# ---------------------------------------------------------------- timeouts abort in the engine


@pytest.mark.vllm
async def test_timed_out_calls_are_aborted_in_the_engine(vllm_backend):
    long = SamplingConfig(max_tokens=1500, temperature=1.0)
    cfg = AggregateConfig(
        strategy="self_consistency", proposals=4, proposer=long, call_timeout_s=0.5,
        retry_backoff_s=0.01,
    )  # fmt: skip
    graph = build_graph(vllm_backend, cfg)
    start = time.monotonic()
    try:
        result = await graph.ainvoke({"question": "Write a very long story about a lighthouse."})
        failures = result["layers"][0]["failures"]
    except LayerFailedError as exc:
        failures = exc.causes
    took = time.monotonic() - start
    assert any("CallTimeoutError" in f for f in failures), failures
    assert all("CallTimeoutError" in f or "EmptyCompletion" in f for f in failures), failures
    assert took < 60  # 1500 tokens x 4 would take minutes here
    # Cancelled requests were aborted: nothing keeps decoding for nobody.
    for _ in range(50):
        if vllm_backend.engine.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.1)
    assert vllm_backend.engine.get_num_unfinished_requests() == 0


# ---------------------------------------------------------------- load through one engine

LOAD_QUESTIONS = 32


@pytest.mark.vllm
async def test_32_concurrent_questions_aft_k4_l1_through_one_engine(vllm_backend):
    short = SamplingConfig(max_tokens=24, temperature=0.8)
    cfg = AggregateConfig(proposals=4, layers=1, proposer=short, aggregator=short)
    spy = Spy(vllm_backend)
    graph = build_graph(spy, cfg)
    max_concurrency = 3
    baseline = _rss_mib()
    peak = [baseline]

    async def sample_memory():
        while True:
            peak[0] = max(peak[0], _rss_mib())
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample_memory())
    start = time.monotonic()
    try:
        results = await asyncio.gather(
            *(
                graph.ainvoke(
                    {"question": f"Q[q{i}] What is {i} + {i}? Answer briefly."},
                    {"max_concurrency": max_concurrency},
                )
                for i in range(LOAD_QUESTIONS)
            )
        )
    finally:
        sampler.cancel()
    took = time.monotonic() - start
    # All finish; none mixed: each question's layers hold only texts generated for it, and its
    # aggregators read exactly its own proposals.
    for i, result in enumerate(results):
        tag = f"q{i}"
        mine = Counter(text for t, _, text in spy.seen if t == tag)
        produced = Counter(t for ly in result["layers"] for t in ly["texts"])
        assert produced <= mine, f"question {i} holds texts generated for another question"
        proposals = [p.strip() for p in result["layers"][0]["texts"]]  # as the prompt shows them
        aggregations = [r for t, r, _ in spy.seen if t == tag and _is_aggregation(r)]
        assert len(aggregations) == 4
        for request in aggregations:
            assert _RESPONSE.findall(request.messages[-1]["content"]) == proposals
        assert result["answer"] in result["layers"][1]["texts"]
    # max_concurrency is honoured per run, and the engine saw them all at once.
    assert max(spy.peak.values()) <= max_concurrency
    assert spy.peak_total > max_concurrency
    grew = peak[0] - baseline
    print(
        f"\nload: {LOAD_QUESTIONS} questions x AFT K=4 L=1 in {took:.1f} s, "
        f"{sum(r['usage']['calls'] for r in results)} calls, "
        f"{sum(r['usage']['failed_calls'] for r in results)} failed, peak in flight "
        f"{spy.peak_total}, RSS {baseline:.0f} -> peak {peak[0]:.0f} MiB (+{grew:.0f})"
    )
    assert grew < 1024  # bounded: the KV cache is preallocated, requests only queue


# ---------------------------------------------------------------- the engine process dies


@pytest.mark.vllm
async def test_a_killed_engine_core_is_a_clear_unavailable_error_and_restarts(small_model_dir):
    from aft_graph.backends import VLLMBackend

    others = {p.pid for p in _engine_cores()}  # the session's shared engine, if started
    backend = VLLMBackend(small_model_dir, max_model_len=MAX_MODEL_LEN, kv_cache_gib=1)
    try:
        spy = Spy(backend)
        slow = SamplingConfig(max_tokens=400, temperature=1.0)
        cfg = AggregateConfig(proposals=3, layers=1, proposer=slow, max_retries=2,
                              retry_backoff_s=0.01)  # fmt: skip
        run = asyncio.create_task(
            build_graph(spy, cfg).ainvoke({"question": "Q[k] Tell a long story."})
        )
        while spy.total < 3:
            await asyncio.sleep(0.05)
        (core,) = [p for p in _engine_cores() if p.pid not in others]
        core.send_signal(signal.SIGKILL)
        with pytest.raises(BackendUnavailableError, match="engine process has died") as info:
            await asyncio.wait_for(run, 120)
        assert isinstance(info.value, LayerFailedError) and info.value.layer == 0
        assert "backend.restart()" in str(info.value)
        # Every later call says so at once, without waiting on the dead engine.
        request = GenerationRequest(
            messages=({"role": "user", "content": "Q[k] hi"},), sampling=Sampling(max_tokens=4)
        )
        start = time.monotonic()
        with pytest.raises(BackendUnavailableError, match="restart"):
            await backend.generate(request)
        assert time.monotonic() - start < 1
        backend.restart()
        (out,) = await backend.generate(request)
        assert out.completion_tokens > 0
    finally:
        await backend.aclose()
    await asyncio.sleep(1)
    assert {p.pid for p in _engine_cores()} <= others  # shut down, none left behind


_UNCLOSED = textwrap.dedent(
    """
    import asyncio, sys
    import psutil
    from aft_graph.backends import GenerationRequest, Sampling, VLLMBackend

    if __name__ == "__main__":
        # A module-level backend that is never closed: alive until the interpreter exits.
        backend = VLLMBackend(sys.argv[1], max_model_len=512, kv_cache_gib=1)
        request = GenerationRequest(
            messages=({"role": "user", "content": "hi"},), sampling=Sampling(max_tokens=4)
        )
        asyncio.run(backend.generate(request))
        print("CHILDREN", *[p.pid for p in psutil.Process().children(recursive=True)], flush=True)
    """
)


@pytest.mark.vllm
def test_a_script_that_never_closes_its_engine_exits_cleanly(small_model_dir, tmp_path):
    import psutil

    script = tmp_path / "unclosed.py"
    script.write_text(_UNCLOSED)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, str(script), str(small_model_dir)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-3000:]
    assert "unexpectedly" not in done.stderr, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("CHILDREN")]
    children = [int(p) for p in line.split()[1:]]
    assert children  # the engine core ran in a child process ...
    time.sleep(2)
    alive = [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert alive == []  # ... and did not outlive the script


# ---------------------------------------------------------------- `vllm serve` restarted


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    """The OpenAI-compatible vLLM server on ``port``: what ``aft-graph engine`` runs (as conftest's
    vllm_server), so the restarted server computes like the in-process engine."""
    from aft_graph.backends.vllm import server_command

    cmd, engine_env = server_command(model_dir, port=port, max_model_len=MAX_MODEL_LEN, kv_cache_gib=1)
    env = {**engine_env, **os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log.open("a") as out:
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_healthy(proc: subprocess.Popen, port: int, log: Path, limit: float = 600) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"the vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the vLLM server was not healthy after {limit} s; log: {log}")


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.vllm
async def test_openai_backend_rides_out_a_vllm_serve_restart(small_model_dir, tmp_path):
    from aft_graph.backends import OpenAIBackend

    port, log = _free_port(), tmp_path / "server.log"
    servers = [_start_server(small_model_dir, port, log)]
    try:
        await asyncio.to_thread(_wait_healthy, servers[0], port, log)
        backend = Spy(OpenAIBackend(f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=120))
        short = SamplingConfig(max_tokens=32, temperature=0.8)
        # Retries back off 1, 2, 4, ... 128 s: 12 attempts ride out minutes of restart.
        cfg = AggregateConfig(proposals=3, layers=1, proposer=short, aggregator=short,
                              max_retries=12, retry_backoff_s=1.0)  # fmt: skip
        graph = build_graph(backend, cfg)
        run = asyncio.create_task(graph.ainvoke({"question": "Q[r] What is 2 + 3?"}))
        while not backend.seen:  # the first proposal is back: the run is under way
            await asyncio.sleep(0.05)
        _stop(servers[0], signal.SIGKILL)  # the server dies mid-run ...
        killed_at = time.monotonic()
        servers.append(_start_server(small_model_dir, port, log))  # ... and is restarted
        result = await asyncio.wait_for(run, 900)
        print(f"\nserve restart: run finished {time.monotonic() - killed_at:.0f} s after the kill, "
              f"{backend.unavailable} calls retried")  # fmt: skip
        assert backend.unavailable > 0  # calls really met the dead server ...
        assert [len(ly["texts"]) for ly in result["layers"]] == [3, 3]  # ... and none was lost
        assert result["usage"]["failed_calls"] == 0
        await backend.aclose()
    finally:
        for proc in servers:
            _stop(proc)
