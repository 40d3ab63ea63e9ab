"""`aft-graph serve` on the ScriptedBackend: a real uvicorn server, the official `openai` client."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from aft_graph.backends import ScriptedBackend  # noqa: E402
from aft_graph.serve import create_app  # noqa: E402

QUESTION = [{"role": "user", "content": "What is 2 + 3? Put the answer in \\boxed{}."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(backend, **settings):
    """A uvicorn server on a free port in a thread; yields its base URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(backend, **settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def client(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", **kwargs)


def status(url: str) -> dict:
    return httpx.get(f"{url}/status").json()


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_models_lists_the_strategies():
    with serving(ScriptedBackend()) as url:
        ids = [m.id for m in client(url).models.list()]
        assert {"aft", "aft-k4-l2", "rsa-n8-k4-t3", "sc-k8"} <= set(ids)
        assert client(url).models.retrieve("aft-k2-l3").id == "aft-k2-l3"
        with pytest.raises(openai.NotFoundError):
            client(url).models.retrieve("gpt-4")


def test_completion_runs_the_named_strategy_and_counts_every_call():
    backend = ScriptedBackend()
    with serving(backend) as url:
        reply = client(url).chat.completions.create(
            model="aft-k3-l2", messages=QUESTION, n=2, max_tokens=20, temperature=0.5, seed=7
        )
    # n=2 runs of K=3 proposals + 2 layers of 3 aggregations
    assert len(backend.calls) == 2 * (3 + 3 * 2)
    assert all(c.sampling.max_tokens == 20 and c.sampling.temperature == 0.5 for c in backend.calls)
    assert len(reply.choices) == 2 and [c.index for c in reply.choices] == [0, 1]
    assert all("boxed" in c.message.content and c.finish_reason == "stop" for c in reply.choices)
    expected_prompt = sum(backend.count_prompt_tokens(c) for c in backend.calls)
    assert reply.usage.prompt_tokens == expected_prompt
    runs = reply.model_extra["aft"]
    assert reply.usage.completion_tokens == sum(r["usage"]["completion_tokens"] for r in runs)
    assert reply.usage.completion_tokens == sum(
        sum(layer["completion_tokens"]) for r in runs for layer in r["layers"]
    )
    assert [r["usage"]["calls"] for r in runs] == [9, 9]
    # choice i is seeded seed + i, so the two runs sample differently
    seeds = {c.sampling.seed for c in backend.calls}
    assert len(seeds) == 18


def test_same_seed_same_answer_and_names_choose_sizes():
    backend = ScriptedBackend()
    with serving(backend) as url:
        c = client(url)
        a = c.chat.completions.create(model="rsa-n4-k2-t1", messages=QUESTION, seed=3, max_tokens=8)
        assert len(backend.calls) == 4 + 4
        b = c.chat.completions.create(model="rsa-n4-k2-t1", messages=QUESTION, seed=3, max_tokens=8)
        assert a.choices[0].message.content == b.choices[0].message.content
        backend.calls.clear()
        c.chat.completions.create(model="sc-k5", messages=QUESTION)
        assert len(backend.calls) == 5
        backend.calls.clear()
        c.chat.completions.create(model="single", messages=QUESTION)
        assert len(backend.calls) == 1
        backend.calls.clear()
        # extra body fields override the name
        c.chat.completions.create(
            model="aft", messages=QUESTION, extra_body={"aggregate": {"proposals": 2, "layers": 0}}
        )
        assert len(backend.calls) == 2


def test_system_message_and_conversation_reach_the_proposals():
    backend = ScriptedBackend()
    messages = [
        {"role": "system", "content": "Answer tersely."},
        {"role": "user", "content": "My number is 41."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Add one to my number."},
    ]
    with serving(backend) as url:
        client(url).chat.completions.create(model="single", messages=messages)
    (call,) = backend.calls
    assert call.messages[0] == {"role": "system", "content": "Answer tersely."}
    assert "My number is 41." in call.messages[-1]["content"]
    assert "Add one to my number." in call.messages[-1]["content"]


def test_stream_sends_layers_before_the_answer_then_usage():
    backend = ScriptedBackend()
    with serving(backend) as url:
        stream = client(url).chat.completions.create(
            model="aft-k2-l2", messages=QUESTION, stream=True, stream_options={"include_usage": True}
        )
        kinds, layers, content, usage = [], [], "", None
        for chunk in stream:
            extra = chunk.model_extra or {}
            if "aft_layer" in extra:
                kinds.append("layer")
                layers.append(extra["aft_layer"])
            elif chunk.usage is not None:
                kinds.append("usage")
                usage = chunk.usage
            elif chunk.choices and chunk.choices[0].delta.content:
                kinds.append("content")
                content += chunk.choices[0].delta.content
    assert [ev["layer"] for ev in layers] == [0, 1, 2]
    assert all(ev["choice"] == 0 and len(ev["texts"]) == 2 for ev in layers)
    assert kinds == ["layer", "layer", "layer", "content", "usage"]
    assert "boxed" in content
    assert usage.completion_tokens == sum(sum(ev["completion_tokens"]) for ev in layers)
    assert len(backend.calls) == 6


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "gpt-4o"}, 404, ["unknown strategy", "aft-k4-l2"]),
        ({"model": "aft-k4-x2"}, 404, ["cannot read 'x2'", "k<proposals>"]),
        ({"model": "rsa-n2-k4"}, 400, ["subset_size <= population"]),
        ({"n": 0}, 400, ["'n'", "greater than or equal to 1"]),
        ({"max_tokens": 0}, 400, ["max_tokens"]),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, ["tool calling is not supported", "as_tool"]),
        ({"logprobs": True}, 400, ["remove 'logprobs'"]),
        ({"aggregate": {"proposal": 3}}, 400, ["'proposal'", "Extra inputs"]),
        ({"aggregate": {"strategy": "best_of_n"}}, 400, ["reward function"]),
        ({"frobnicate": 1}, 400, ["unknown field 'frobnicate'", "aggregate"]),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, ["last message must be the user's question"]),
        ({"messages": []}, 400, ["'messages'"]),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, ["only text content parts"]),
    ],
)
def test_bad_requests_get_openai_errors_naming_the_fix(body, status, words):
    backend = ScriptedBackend()
    with serving(backend) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", json={"model": "aft", "messages": QUESTION, **body})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    assert backend.calls == []  # refused before any generation


def test_openai_client_raises_the_error_with_its_message():
    with serving(ScriptedBackend()) as url, pytest.raises(openai.BadRequestError, match="tool calling"):
        client(url).chat.completions.create(
            model="aft", messages=QUESTION,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        )  # fmt: skip


def test_prompt_too_long_is_a_400():
    backend = ScriptedBackend(context_window=12)
    with serving(backend) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", json={"model": "aft", "messages": QUESTION})
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "context_length_exceeded"


def test_concurrency_limit_answers_429():
    backend = ScriptedBackend(delay=0.5)
    with serving(backend, max_concurrency=1) as url:
        body = {"model": "single", "messages": QUESTION}
        with httpx.Client() as http, contextlib.ExitStack():
            first = threading.Thread(target=lambda: http.post(f"{url}/v1/chat/completions", json=body, timeout=10))
            first.start()
            wait_until(lambda: status(url)["in_flight"] == 1)
            busy = http.post(f"{url}/v1/chat/completions", json=body, timeout=10)
            first.join()
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert "--max-concurrency" in busy.json()["error"]["message"]
        assert status(url)["completed"] == 1


def test_request_timeout_cancels_the_run_and_is_not_retried():
    backend = ScriptedBackend(delay=1.0)
    with serving(backend, request_timeout=0.3) as url:
        with pytest.raises(openai.APIStatusError) as info:
            client(url, max_retries=2).chat.completions.create(model="aft-k2-l3", messages=QUESTION)
        assert info.value.status_code == 504
        assert "--request-timeout" in info.value.message
        stats = status(url)
        assert stats["timed_out"] == 1 and stats["in_flight"] == 0  # one attempt, not three
    assert len(backend.calls) == 2  # only the proposals had started


def test_stream_disconnect_cancels_the_run():
    backend = ScriptedBackend(delay=0.3)
    with serving(backend) as url:
        body = {"model": "aft-k2-l5", "messages": QUESTION, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as reply:
            for line in reply.iter_lines():
                if line.startswith("data:") and "aft_layer" in line:
                    assert json.loads(line[5:])["aft_layer"]["layer"] == 0
                    break  # the first layer arrived: hang up
        wait_until(lambda: status(url)["in_flight"] == 0)
        stats = status(url)
        assert stats["cancelled"] == 1 and stats["completed"] == 0
        calls = len(backend.calls)
        time.sleep(1.0)
        assert len(backend.calls) == calls  # nothing new starts after the cancellation
        assert calls < 2 + 2 * 5


def test_non_streamed_disconnect_cancels_the_run():
    backend = ScriptedBackend(delay=0.3)
    with serving(backend) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json={"model": "aft-k2-l5", "messages": QUESTION}, timeout=0.5)
        wait_until(lambda: status(url)["in_flight"] == 0)
        stats = status(url)
        assert stats["cancelled"] == 1 and stats["completed"] == 0
        assert len(backend.calls) < 2 + 2 * 5


def test_factory_backend_is_built_at_start_and_closed_at_stop():
    made = []

    def factory():
        made.append(ScriptedBackend())
        return made[-1]

    with serving(factory) as url:
        assert client(url).chat.completions.create(model="single", messages=QUESTION).choices
        assert len(made) == 1 and not made[0].closed
    assert made[0].closed


def test_settings_are_checked():
    with pytest.raises(ValueError, match="at least 1"):
        create_app(ScriptedBackend(), max_concurrency=0)
    with pytest.raises(ValueError, match="positive"):
        create_app(ScriptedBackend(), request_timeout=0)


def test_cli_serve_builds_the_app_from_its_options(monkeypatch):
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from aft_graph import cli

    fake = ScriptedBackend()
    seen = {}

    def make_backend(model, base_url, max_model_len, lora=False, verbose=False):
        seen.update(model=model, base_url=base_url, max_model_len=max_model_len, lora=lora)
        return fake

    def run(app, host, port, log_level):
        seen.update(host=host, port=port)
        with TestClient(app) as http:  # runs the lifespan: the backend is built here
            reply = http.post("/v1/chat/completions", json={"model": "aft-k2-l1", "messages": QUESTION})
            seen["status"] = reply.status_code
            seen["busy_limit"] = http.get("/status").json()["max_concurrency"]

    monkeypatch.setattr(cli, "make_backend", make_backend)
    monkeypatch.setattr(uvicorn, "run", run)
    result = CliRunner().invoke(
        cli.app,
        ["serve", "--base-url", "http://h:8000/v1", "--port", "9999", "--max-concurrency", "3", "--lora", "adapter"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert seen == {
        "model": "default", "base_url": ["http://h:8000/v1"], "max_model_len": 4096, "lora": True,
        "host": "127.0.0.1", "port": 9999, "status": 200, "busy_limit": 3,
    }  # fmt: skip
    # --lora applies to the aggregation calls only
    assert [c.lora for c in fake.calls] == [None, None, "adapter", "adapter"]
    assert fake.closed
    bad = CliRunner().invoke(cli.app, ["serve", "--max-concurrency", "0"])
    assert bad.exit_code == 2 and "at least 1" in bad.output


def test_langchain_chat_openai_talks_to_the_server():
    langchain_openai = pytest.importorskip("langchain_openai")
    backend = ScriptedBackend()
    with serving(backend) as url:
        model = langchain_openai.ChatOpenAI(model="aft-k2-l1", base_url=f"{url}/v1", api_key="unused", max_tokens=16)
        reply = model.invoke("What is 2 + 3?")
        assert "boxed" in reply.content
        # usage counts the 4 calls of the run, not only the returned text
        assert reply.usage_metadata["output_tokens"] >= 4 * len(reply.content.split())
        chunks = list(model.stream("What is 2 + 3?"))
        assert "boxed" in "".join(c.content for c in chunks)
    assert len(backend.calls) == 2 * 4
