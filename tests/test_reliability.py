"""Reliability of the graph through its public API: the six defects of issue 13, timeouts and the
per-run deadline, minimum survivors, resume, 200 concurrent runs, cancellation, and fuzzing.

Everything here runs on ScriptedBackend (fast, part of ``make test``); the faults are injected by
:class:`Faulty`, which picks each call's fate from its layer and index. docs/reliability.md
tabulates what these tests inject and hold.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import ValidationError

from aft_graph import AggregateConfig, LayerFailedError, SamplingConfig, build_graph
from aft_graph.backends import BackendError, BackendUnavailableError, ScriptedBackend
from aft_graph.backends.base import GenerationRequest, derive_seed

FAST = SamplingConfig(max_tokens=64)


def _cfg(**kw: Any) -> AggregateConfig:
    kw.setdefault("retry_backoff_s", 0.001)
    return AggregateConfig(proposer=FAST, aggregator=FAST, **kw)


def _echo(req: GenerationRequest, i: int) -> str:
    """A text naming the call (its seed) and the question it was asked, for mix-up checks."""
    question = re.search(r"Q\[(\w+)\]", req.messages[-1]["content"])
    tag = question.group(1) if question else "?"
    return f"from-{tag} seed-{req.sampling.seed} \\boxed{{{req.sampling.seed % 3}}}"


class Faulty(ScriptedBackend):
    """ScriptedBackend whose call (layer, index) behaves as ``plan[(layer, index)]`` says.

    Fates: ``ok``, ``empty`` (no text), ``permanent`` (BackendError), ``transient`` (always
    BackendUnavailableError), ``flaky`` (BackendUnavailableError on the first attempt only),
    ``hang`` (never answers), ``none`` / ``two`` (0 or 2 completions), ``str`` (returns strings),
    ``runtime`` (RuntimeError), ``timeout`` (its own asyncio.TimeoutError).
    """

    def __init__(self, config: AggregateConfig, plan: dict[tuple[int, int], str] | None = None):
        super().__init__(_echo)
        self.plan = dict(plan or {})
        self.seeds = {
            derive_seed(config.seed, layer, i): (layer, i) for layer in range(8) for i in range(16)
        }
        self.attempts: dict[tuple[int, int], int] = {}
        self.cancelled = 0
        self.in_flight = 0

    def fate(self, request: GenerationRequest) -> tuple[tuple[int, int], str]:
        key = self.seeds.get(request.sampling.seed, (-1, -1))
        return key, self.plan.get(key, "ok")

    async def generate(self, request: GenerationRequest):
        key, fate = self.fate(request)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        self.in_flight += 1
        try:
            if fate == "hang":
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    self.cancelled += 1  # what an engine abort would see
                    raise
            if fate == "permanent":
                self.calls.append(request)
                raise BackendError("the model refused")
            if fate == "transient" or (fate == "flaky" and self.attempts[key] == 1):
                self.calls.append(request)
                raise BackendUnavailableError("connection refused")
            if fate == "runtime":
                raise RuntimeError("engine exploded")
            if fate == "timeout":
                raise TimeoutError("socket read timed out")
            out = await super().generate(request)
            if fate == "empty":
                return [out[0].model_copy(update={"text": "  ", "completion_tokens": 0})]
            if fate == "none":
                return []
            if fate == "two":
                return out * 2
            if fate == "str":
                return [c.text for c in out]
            return out
        finally:
            self.in_flight -= 1


def _thread(name: str = "t") -> dict[str, Any]:
    return {"configurable": {"thread_id": name}}


# ---------------------------------------------------------------- defect 1: no stuck thread


async def test_a_layer_that_failed_completely_resumes_once_the_backend_is_fixed():
    cfg = _cfg(proposals=3, layers=2)
    backend = Faulty(cfg, {(2, i): "permanent" for i in range(3)})
    graph = build_graph(backend, cfg, checkpointer=InMemorySaver())
    with pytest.raises(LayerFailedError, match=r"layer 2 kept 0 of its 3") as info:
        await graph.ainvoke({"question": "Q[a] 2+2?"}, _thread())
    assert info.value.layer == 2 and len(info.value.causes) == 3
    assert all("the model refused" in c for c in info.value.causes)
    assert "ainvoke(None, config)" in str(info.value)

    backend.plan.clear()  # the backend is fixed
    before = len(backend.calls)
    result = await graph.ainvoke(None, _thread())
    # Exactly the 3 failed calls ran again; layers 0 and 1 were not regenerated.
    assert len(backend.calls) - before == 3
    assert [ly["layer"] for ly in result["layers"]] == [0, 1, 2]
    assert result["answer"] in result["layers"][2]["texts"]


async def test_resume_on_a_sqlite_checkpointer_after_a_failed_layer(tmp_path):
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    cfg = _cfg(proposals=2, layers=1)
    async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "ckpt.sqlite")) as saver:
        backend = Faulty(cfg, {(1, 0): "permanent", (1, 1): "permanent"})
        graph = build_graph(backend, cfg, checkpointer=saver)
        with pytest.raises(LayerFailedError):
            await graph.ainvoke({"question": "Q[b] x?"}, _thread("s"))
        fixed = Faulty(cfg)
        result = await build_graph(fixed, cfg, checkpointer=saver).ainvoke(None, _thread("s"))
    assert len(fixed.calls) == 2  # a new process would redo only the failed layer's calls
    assert len(result["layers"]) == 2


# ---------------------------------------------------------------- defect 2: no stale answers


@pytest.mark.parametrize("first", ["question", "messages"])
async def test_a_second_turn_on_a_thread_answers_the_second_question(first):
    cfg = _cfg(proposals=2, layers=1)
    backend = Faulty(cfg)
    graph = build_graph(backend, cfg, checkpointer=InMemorySaver())
    turn1 = (
        {"question": "Q[first] one?"}
        if first == "question"
        else {"messages": [HumanMessage("Q[first] one?")]}
    )
    one = await graph.ainvoke(turn1, _thread())
    assert one["answer"].startswith("from-first")
    calls = len(backend.calls)
    two = await graph.ainvoke({"messages": [HumanMessage("Q[second] two?")]}, _thread())
    assert two["answer"].startswith("from-second")
    assert all("Q[second]" in c.messages[-1]["content"] for c in backend.calls[calls:])
    assert all(t.startswith("from-second") for ly in two["layers"] for t in ly["texts"])
    three = await graph.ainvoke({"question": "Q[third] three?"}, _thread())
    assert three["answer"].startswith("from-third")


# ---------------------------------------------------------------- defect 3: no hang


async def test_a_hanging_call_times_out_is_cancelled_and_the_layer_goes_on():
    cfg = _cfg(proposals=3, layers=1, call_timeout_s=0.2)
    backend = Faulty(cfg, {(0, 1): "hang"})
    start = time.monotonic()
    result = await asyncio.wait_for(build_graph(backend, cfg).ainvoke({"question": "Q[h] ?"}), 10)
    assert time.monotonic() - start < 5
    (failure,) = result["layers"][0]["failures"]
    assert failure.startswith("call 1: CallTimeoutError") and "call_timeout_s" in failure
    assert backend.cancelled == 1 and backend.in_flight == 0  # cancelled, i.e. aborted
    assert result["layers"][1]["sources"] == [[0, 1]] * 3
    assert result["usage"]["failed_calls"] == 1


async def test_the_run_deadline_stops_a_hung_run_and_a_resume_gets_a_fresh_deadline():
    cfg = _cfg(proposals=2, layers=1, run_timeout_s=0.3, call_timeout_s=None)
    backend = Faulty(cfg, {(1, 0): "hang", (1, 1): "hang"})
    graph = build_graph(backend, cfg, checkpointer=InMemorySaver())
    start = time.monotonic()
    with pytest.raises(LayerFailedError, match="run_timeout_s") as info:
        await asyncio.wait_for(graph.ainvoke({"question": "Q[d] ?"}, _thread()), 10)
    assert time.monotonic() - start < 3
    assert info.value.layer == 1 and backend.in_flight == 0
    backend.plan.clear()
    result = await graph.ainvoke(None, _thread())  # a new invocation: a new 0.3 s deadline
    assert len(result["layers"]) == 2


async def test_the_run_deadline_counts_from_the_start_of_the_invocation_across_layers():
    cfg = _cfg(proposals=2, layers=2, run_timeout_s=0.5, call_timeout_s=None)
    backend = Faulty(cfg)
    backend.delay = 0.2  # each layer takes 0.2 s: layer 2 would end at 0.6 s
    with pytest.raises(LayerFailedError, match="run_timeout_s") as info:
        await asyncio.wait_for(build_graph(backend, cfg).ainvoke({"question": "Q[l] ?"}), 10)
    assert info.value.layer == 2


def test_timeouts_and_minimum_are_validated():
    for bad in ({"call_timeout_s": 0}, {"run_timeout_s": -1}, {"min_survivors": 0}):
        with pytest.raises(ValidationError):
            AggregateConfig(**bad)
    assert AggregateConfig().call_timeout_s == 1800  # a finite default: a hung engine ends


# ---------------------------------------------------------------- defect 4: transient failures


async def test_a_call_that_exhausts_its_retries_is_a_failed_call_not_a_failed_run():
    cfg = _cfg(proposals=3, layers=1, max_retries=3)
    backend = Faulty(cfg, {(0, 2): "transient", (0, 0): "flaky"})
    result = await build_graph(backend, cfg).ainvoke({"question": "Q[t] ?"})
    assert backend.attempts[(0, 2)] == 3 and backend.attempts[(0, 0)] == 2
    (failure,) = result["layers"][0]["failures"]
    assert failure == "call 2: BackendUnavailableError: connection refused (after 3 attempts)"
    assert len(result["layers"][0]["texts"]) == 2  # the other proposals' work is kept


async def test_an_unreachable_backend_stops_the_run_with_a_named_unavailable_error():
    cfg = _cfg(proposals=2, layers=1, max_retries=2)
    backend = Faulty(cfg, {(0, 0): "transient", (0, 1): "transient"})
    with pytest.raises(BackendUnavailableError, match=r"layer 0 kept 0 of its 2") as info:
        await build_graph(backend, cfg).ainvoke({"question": "Q[u] ?"})
    assert isinstance(info.value, LayerFailedError)
    assert "call 0: BackendUnavailableError" in str(info.value) and "after 2 attempts" in str(
        info.value
    )
    assert "checkpointer" in str(info.value)  # says how to make it resumable


async def test_min_survivors_stops_a_thin_layer_and_resume_completes_it():
    cfg = _cfg(proposals=4, layers=1, min_survivors=3)
    backend = Faulty(cfg, {(0, 1): "permanent", (0, 3): "empty"})
    graph = build_graph(backend, cfg, checkpointer=InMemorySaver())
    with pytest.raises(LayerFailedError) as info:
        await graph.ainvoke({"question": "Q[m] ?"}, _thread())
    err = info.value
    assert (err.layer, err.succeeded, err.calls, err.needed) == (0, 2, 4, 3)
    assert [c.split(":")[0] for c in err.causes] == ["call 1", "call 3"]
    assert "EmptyCompletion" in str(err) and "the model refused" in str(err)
    backend.plan.clear()
    before = len(backend.calls)
    result = await graph.ainvoke(None, _thread())
    assert len(backend.calls) - before == 2 + 4  # the two failed proposals, then layer 1
    assert len(result["layers"][0]["texts"]) == 4 and result["layers"][0]["failures"] == []


async def test_a_layer_with_enough_survivors_goes_on():
    cfg = _cfg(proposals=4, layers=1, min_survivors=3)
    backend = Faulty(cfg, {(0, 1): "permanent"})
    result = await build_graph(backend, cfg).ainvoke({"question": "Q[e] ?"})
    assert len(result["layers"][0]["texts"]) == 3 and backend.attempts[(0, 1)] == 1


# ---------------------------------------------------------------- defect 5: contract violations


@pytest.mark.parametrize(
    "fate, cause",
    [
        ("none", "BackendContractError: Faulty.generate returned 0 completions"),
        ("two", "BackendContractError: Faulty.generate returned 2 completions"),
        ("str", "BackendContractError: Faulty.generate returned a str, not a Completion"),
        ("runtime", "RuntimeError: engine exploded"),
        ("timeout", "TimeoutError: socket read timed out"),
    ],
)
async def test_contract_violations_and_custom_errors_are_named_failures(fate, cause):
    cfg = _cfg(proposals=2, layers=1)
    backend = Faulty(cfg, {(1, 0): fate})
    result = await build_graph(backend, cfg).ainvoke({"question": "Q[c] ?"})
    (failure,) = result["layers"][1]["failures"]
    assert failure.startswith(f"call 0: {cause}")
    every = Faulty(cfg, {(0, 0): fate, (0, 1): fate})
    with pytest.raises(LayerFailedError, match=re.escape(cause)) as info:
        await build_graph(every, cfg).ainvoke({"question": "Q[c] ?"})
    assert info.value.layer == 0


@pytest.mark.parametrize("backend", [None, object(), "vllm"])
def test_build_graph_refuses_what_is_not_a_backend(backend):
    with pytest.raises(TypeError, match="needs a generation backend"):
        build_graph(backend)


def test_build_graph_refuses_a_config_that_is_not_an_aggregate_config():
    with pytest.raises(TypeError, match="AggregateConfig"):
        build_graph(ScriptedBackend(), {"proposals": 4})


# ---------------------------------------------------------------- defect 6: smaller ones


def test_an_empty_stop_string_is_refused():
    with pytest.raises(ValidationError, match="empty string"):
        SamplingConfig(stop=("",))
    with pytest.raises(ValidationError, match="empty string"):
        AggregateConfig(proposer={"stop": ["###", ""]})


async def test_empty_completions_are_failures_and_never_reach_the_aggregators():
    cfg = _cfg(proposals=3, layers=1)
    backend = Faulty(cfg, {(0, 0): "empty"})
    result = await build_graph(backend, cfg).ainvoke({"question": "Q[e] ?"})
    assert result["layers"][0]["failures"][0].startswith("call 0: EmptyCompletion")
    assert result["layers"][1]["sources"] == [[0, 1]] * 3
    assert result["usage"]["failed_calls"] == 1
    every = Faulty(cfg, {(0, i): "empty" for i in range(3)})
    with pytest.raises(LayerFailedError, match="EmptyCompletion"):
        await build_graph(every, cfg).ainvoke({"question": "Q[e] ?"})


@pytest.mark.parametrize("question", [2, b"2+2?", ["2+2?"], {"q": 1}, 2.5])
async def test_a_question_that_is_not_text_is_refused_before_any_call(question):
    backend = ScriptedBackend()
    with pytest.raises(TypeError, match="the question must be text"):
        await build_graph(backend, _cfg()).ainvoke({"question": question})
    assert backend.calls == []


@pytest.mark.parametrize(
    "field, value",
    [("proposals", "4"), ("proposals", True), ("layers", 1.0), ("single_final_aggregation", "yes"),
     ("max_retries", "3"), ("min_survivors", False)],
)  # fmt: skip
def test_config_numbers_are_not_coerced(field, value):
    with pytest.raises(ValidationError):
        AggregateConfig(**{field: value})


# ---------------------------------------------------------------- load and cancellation


async def test_200_concurrent_runs_keep_their_own_texts_and_events():
    cfg = _cfg(proposals=3, layers=1)
    backend = Faulty(cfg)
    backend.delay = 0.001
    graph = build_graph(backend, cfg)

    async def one(i: int) -> tuple[int, dict, list]:
        events = []
        result = None
        async for mode, chunk in graph.astream(
            {"question": f"Q[n{i}] what?"}, stream_mode=["custom", "values"]
        ):
            if mode == "custom":
                events.append(chunk)
            else:
                result = chunk
        return i, result, events

    runs = await asyncio.gather(*(one(i) for i in range(200)))
    for i, result, events in runs:
        mine = f"from-n{i} "
        assert result["answer"].startswith(mine)
        assert all(t.startswith(mine) for ly in result["layers"] for t in ly["texts"])
        assert [e.layer for e in events] == [0, 1]
        assert all(t.startswith(mine) for e in events for t in e.texts)
    assert len(backend.calls) == 200 * 6


async def test_cancelling_a_run_cancels_its_calls():
    cfg = _cfg(proposals=3, layers=1, call_timeout_s=None)
    backend = Faulty(cfg, {(0, i): "hang" for i in range(3)})
    task = asyncio.create_task(build_graph(backend, cfg).ainvoke({"question": "Q[x] ?"}))
    while backend.in_flight < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.cancelled == 3 and backend.in_flight == 0


# ---------------------------------------------------------------- fuzzing

FAULTS = ["empty", "permanent", "transient", "flaky", "hang", "none", "two", "str", "runtime",
          "timeout"]  # fmt: skip
FATES = ["ok"] * 3 * len(FAULTS) + FAULTS  # a call fails 1 time in 4
OUR_ERRORS = (LayerFailedError,)
FUZZ_FAULT_EXAMPLES = 300
FUZZ_INPUT_EXAMPLES = 300
FUZZ_CONFIG_EXAMPLES = 300


@settings(max_examples=FUZZ_FAULT_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    strategy=st.sampled_from(["propose_aggregate", "rsa", "self_consistency", "self_refine"]),
    k=st.integers(1, 4),
    depth=st.integers(0, 2),
    min_survivors=st.integers(1, 3),
    fates=st.lists(st.sampled_from(FATES), min_size=16, max_size=16),
)
async def test_fuzz_faults_end_in_an_answer_or_a_named_layer_error(
    strategy, k, depth, min_survivors, fates
):
    cfg = _cfg(
        strategy=strategy, proposals=k, layers=depth, population=k, subset_size=min(2, k),
        steps=depth, min_survivors=min_survivors, max_retries=2, call_timeout_s=0.05,
    )  # fmt: skip
    plan = {(layer, i): fates[(layer * 5 + i) % 16] for layer in range(depth + 1) for i in range(k)}
    backend = Faulty(cfg, plan)
    try:
        result = await asyncio.wait_for(
            build_graph(backend, cfg).ainvoke({"question": "Q[f] ?"}), 10
        )
    except OUR_ERRORS as exc:
        event(f"stopped: {type(exc).__name__}")
        assert re.match(r"layer \d+ kept \d+ of its \d+ generation calls", str(exc))
        assert exc.succeeded < exc.needed and exc.causes
    else:
        event("answered" + (" (with failed calls)" if result["usage"]["failed_calls"] else ""))
        last = result["layers"][-1]
        assert result["answer"] in last["texts"]
        assert all(t.strip() for ly in result["layers"] for t in ly["texts"])
        assert result["usage"]["failed_calls"] == sum(
            len(ly["failures"]) for ly in result["layers"]
        )
    assert backend.in_flight == 0  # nothing left running: hung calls were cancelled


_ANY = st.one_of(
    st.text(max_size=40), st.integers(), st.binary(max_size=10), st.none(), st.floats(),
    st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip


@settings(max_examples=FUZZ_INPUT_EXAMPLES, deadline=None, derandomize=True)
@given(
    payload=st.one_of(
        st.fixed_dictionaries({"question": _ANY}),
        st.fixed_dictionaries({"messages": st.lists(st.text(max_size=30), max_size=3)}),
        st.fixed_dictionaries({"question": _ANY, "messages": st.lists(st.text(max_size=30), max_size=2)}),
    )
)  # fmt: skip
async def test_fuzz_inputs_are_answered_or_refused_before_any_call(payload):
    if "messages" in payload:
        payload = {**payload, "messages": [HumanMessage(m) for m in payload["messages"]]}
    backend = ScriptedBackend(context_window=100_000)
    try:
        result = await build_graph(backend, _cfg(proposals=2, layers=1)).ainvoke(payload)
    except (TypeError, ValueError) as exc:
        event(f"refused: {type(exc).__name__}")
        assert backend.calls == []
        assert "question" in str(exc)
    else:
        event("answered")
        assert isinstance(result["answer"], str) and result["answer"]
        assert len(backend.calls) == 4


_CONFIG_FIELDS = {
    "strategy": st.sampled_from(["propose_aggregate", "rsa", "self_consistency", "best_of_n",
                                 "self_refine", "beam", ""]),
    "proposals": st.one_of(st.integers(-1, 5), st.text(max_size=2), st.booleans(), st.floats(-1, 5)),
    "layers": st.one_of(st.integers(-1, 3), st.text(max_size=2)),
    "population": st.integers(-1, 5), "subset_size": st.integers(-1, 5), "steps": st.integers(-1, 3),
    "min_survivors": st.one_of(st.integers(-1, 5), st.booleans()),
    "call_timeout_s": st.one_of(st.none(), st.floats(-1, 10)),
    "proposer": st.one_of(st.fixed_dictionaries({"max_tokens": st.integers(-1, 64)}),
                          st.fixed_dictionaries({"stop": st.lists(st.text(max_size=2), max_size=2)})),
    "select": st.sampled_from([None, "last", "majority", "reward", "best"]),
}  # fmt: skip


@settings(max_examples=FUZZ_CONFIG_EXAMPLES, deadline=None, derandomize=True)
@given(fields=st.fixed_dictionaries({}, optional=_CONFIG_FIELDS))
async def test_fuzz_configs_are_refused_up_front_or_run(fields):
    try:
        cfg = AggregateConfig(retry_backoff_s=0.001, **fields)
    except ValidationError:
        event("refused: ValidationError")
        return
    backend = ScriptedBackend(context_window=100_000)
    try:
        graph = build_graph(backend, cfg, reward_fn=lambda q, t: len(t))
        result = await graph.ainvoke({"question": "Q[z] 2+2?"})
    except ValueError as exc:  # e.g. max_tokens leaving no room: refused before generating
        event(f"refused by build_graph/prepare: {type(exc).__name__}")
        assert backend.calls == [], exc
    else:
        event("ran")
        assert result["answer"] in result["layers"][-1]["texts"]


async def test_completions_the_backend_returns_as_dicts_are_validated():
    """A custom backend may return dicts with Completion's fields; other dicts are named failures."""

    class DictBackend(ScriptedBackend):
        async def generate(self, request):
            out = [c.model_dump() for c in await super().generate(request)]
            return out if request.sampling.seed % 2 else [{"txt": "?"}]

    backend = DictBackend(_echo)
    result = await build_graph(backend, _cfg(proposals=6, layers=0)).ainvoke({"question": "Q[d] ?"})
    odd = [c for c in backend.calls if c.sampling.seed % 2]
    assert len(result["layers"][0]["texts"]) == len(odd) > 0
    assert all("returned a dict, not a Completion" in f for f in result["layers"][0]["failures"])


# ---------------------------------------------------------------- HTTP: a timed-out call hangs up


class _HangingServer:
    """An OpenAI-compatible server that never answers a completion; it records when the client
    hangs up (what makes `vllm serve` abort the request)."""

    def __init__(self) -> None:
        import select
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.hung_up = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                card = {"id": "m", "object": "model", "created": 0, "owned_by": "vllm",
                        "max_model_len": 4096}  # fmt: skip
                data = json.dumps({"object": "list", "data": [card]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                end = time.monotonic() + 20
                while time.monotonic() < end:
                    ready, _, _ = select.select([self.connection], [], [], 0.05)
                    if ready and self.connection.recv(1, socket.MSG_PEEK) == b"":
                        server.hung_up.set()
                        return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


async def test_a_timed_out_http_call_hangs_up_on_the_server():
    from aft_graph.backends import OpenAIBackend

    server = _HangingServer()
    try:
        backend = OpenAIBackend(server.url, max_retries=0)
        cfg = _cfg(strategy="self_consistency", proposals=1, call_timeout_s=0.3)
        start = time.monotonic()
        with pytest.raises(LayerFailedError, match="CallTimeoutError"):
            await asyncio.wait_for(build_graph(backend, cfg).ainvoke({"question": "Q[w] ?"}), 15)
        assert time.monotonic() - start < 5
        assert await asyncio.to_thread(server.hung_up.wait, 5)  # the request was cancelled
        await backend.aclose()
    finally:
        server.close()


def test_the_command_line_reports_a_failed_run_without_a_traceback(monkeypatch):
    from typer.testing import CliRunner

    from aft_graph import cli

    broken = Faulty(AggregateConfig(), {(0, i): "permanent" for i in range(4)})
    monkeypatch.setattr(cli, "make_backend", lambda *a, **k: broken)
    result = CliRunner().invoke(cli.app, ["run", "Q[c] 2+2? [bold]", "--proposals", "4"])
    assert result.exit_code == 1
    assert "LayerFailedError" in result.output and "layer 0 kept 0 of its 4" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # typer.Exit(1), not the error itself


def test_input_and_output_json_schemas_build():
    """LangGraph Server and HTTP front ends read these; the question is a string input."""
    graph = build_graph(ScriptedBackend())
    assert graph.get_input_jsonschema()["properties"]["question"]["type"] == "string"
    assert {"answer", "layers", "usage"} <= set(graph.get_output_jsonschema()["properties"])
