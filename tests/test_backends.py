"""Backends without a real model: requests, ScriptedBackend, ChatModelBackend on LangChain's fake
chat models, OpenAIBackend against a tiny in-test OpenAI-compatible server (and a dead URL), and
the micro-batch planning of HFBackend."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from langchain_core.language_models.fake_chat_models import (
    FakeListChatModel,
    GenericFakeChatModel,
)
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ValidationError

from aft_graph.backends import (
    Backend,
    BackendError,
    BackendUnavailableError,
    ChatModelBackend,
    Completion,
    GenerationRequest,
    OpenAIBackend,
    PromptTooLongError,
    Sampling,
    ScriptedBackend,
)
from aft_graph.backends.base import check_fits, cut_at_stop, derive_seed
from aft_graph.models import ModelNotFoundError

USER = ({"role": "user", "content": "What is 2 + 2?"},)


def chat(content: str = "What is 2 + 2?", **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        messages=({"role": "user", "content": content},), sampling=Sampling(**sampling)
    )


# ------------------------------------------------------------------ requests and helpers


class TestRequestValidation:
    def test_n_below_one(self):
        with pytest.raises(ValidationError, match=r"n=0 asks for no completions: set n to 1 or more"):
            Sampling(n=0)

    def test_max_tokens_below_one(self):
        with pytest.raises(ValidationError, match=r"max_tokens=0 leaves no room .* set max_tokens to 1"):
            Sampling(max_tokens=0)

    def test_both_messages_and_prompt(self):
        with pytest.raises(ValidationError, match="exactly one"):
            GenerationRequest(messages=USER, prompt="hi")

    def test_neither_messages_nor_prompt(self):
        with pytest.raises(ValidationError, match="exactly one"):
            GenerationRequest()

    def test_empty_messages(self):
        with pytest.raises(ValidationError, match="empty"):
            GenerationRequest(messages=())

    def test_message_without_role(self):
        with pytest.raises(ValidationError, match="'role' and 'content'"):
            GenerationRequest(messages=({"content": "hi"},))

    def test_requests_are_frozen_and_hashable(self):
        request = chat(n=2, stop=["x"])
        assert request.sampling.stop == ("x",)
        with pytest.raises(ValidationError):
            request.sampling.n = 3  # type: ignore[misc]


def test_check_fits_clamps_and_rejects():
    assert check_fits(10, Sampling(max_tokens=50), 100) == 50
    assert check_fits(90, Sampling(max_tokens=50), 100) == 10
    with pytest.raises(PromptTooLongError, match="100 tokens but the model's context window is 100"):
        check_fits(100, Sampling(), 100)


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("a b STOP c END", ("END", "STOP")) == ("a b ", True)
    assert cut_at_stop("no stop here", ("END",)) == ("no stop here", False)
    assert cut_at_stop("anything", ()) == ("anything", False)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(None, 1) is None
    assert derive_seed(7, "layer", 1) == derive_seed(7, "layer", 1)
    assert derive_seed(7, "layer", 1) != derive_seed(7, "layer", 2)
    assert 0 <= derive_seed(7, "x") < 2**31


# ------------------------------------------------------------------ ScriptedBackend


class TestScriptedBackend:
    async def test_is_a_backend_and_returns_n_completions(self):
        backend = ScriptedBackend()
        assert isinstance(backend, Backend)
        out = await backend.generate(chat(n=3, seed=1))
        assert len(out) == 3
        assert all(isinstance(c, Completion) for c in out)
        assert backend.calls == [chat(n=3, seed=1)]

    async def test_same_seed_same_text(self):
        backend = ScriptedBackend()
        first = await backend.generate(chat(n=4, seed=5))
        again = await backend.generate(chat(n=4, seed=5))
        other = await backend.generate(chat(n=4, seed=6))
        assert [c.text for c in first] == [c.text for c in again]
        assert [c.text for c in first] != [c.text for c in other]

    async def test_script_cycles_in_call_order(self):
        backend = ScriptedBackend(["one", "two"])
        out = await backend.generate(chat(n=3))
        assert [c.text for c in out] == ["one", "two", "one"]

    async def test_token_accounting_stop_and_length(self):
        backend = ScriptedBackend(lambda _r, _i: "w1 w2 w3 STOP w5 w6")
        stopped = await backend.generate(chat(stop=("STOP",)))
        assert stopped[0].text.split() == ["w1", "w2", "w3"]
        assert stopped[0].finish_reason == "stop"
        assert stopped[0].completion_tokens == 3
        assert stopped[0].prompt_tokens == backend.count_prompt_tokens(chat())

        cut = await backend.generate(chat(max_tokens=2))
        assert cut[0].text == "w1 w2"
        assert cut[0].finish_reason == "length"
        assert cut[0].completion_tokens == 2

    async def test_prompt_too_long(self):
        backend = ScriptedBackend(context_window=5)
        with pytest.raises(PromptTooLongError):
            await backend.generate(chat("one two three four five six"))

    async def test_budget_clamped_to_context_window(self):
        backend = ScriptedBackend(lambda _r, _i: "a " * 50, context_window=10)
        out = await backend.generate(GenerationRequest(prompt="p q r", sampling=Sampling(max_tokens=100)))
        assert out[0].completion_tokens == 7  # 10 - 3 prompt words
        assert out[0].finish_reason == "length"

    async def test_failure_predicate(self):
        backend = ScriptedBackend(fail=lambda r: r.sampling.seed == 13)
        await backend.generate(chat(seed=12))
        with pytest.raises(BackendUnavailableError):
            await backend.generate(chat(seed=13))

    async def test_concurrent_calls_overlap(self):
        backend = ScriptedBackend(delay=0.2)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.gather(*(backend.generate(chat(seed=i)) for i in range(5)))
        assert loop.time() - start < 0.6  # 5 x 0.2 s if they ran one after another

    async def test_count_and_truncate(self):
        backend = ScriptedBackend()
        assert backend.count_tokens("a b  c") == 3
        assert backend.truncate("a b c d", 2) == "a b"
        assert backend.truncate("a b", 5) == "a b"
        await backend.aclose()
        assert backend.closed


# ------------------------------------------------------------------ ChatModelBackend


class RecordingChatModel(FakeListChatModel):
    """A fake chat model with the sampling fields real integrations have; records each call."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    seen: ClassVar[list[dict[str, Any]]] = []

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        type(self).seen.append(
            dict(
                messages=messages,
                stop=stop,
                temperature=self.temperature,
                top_p=self.top_p,
                max_tokens=self.max_tokens,
                seed=self.seed,
            )
        )
        text = f"seed={self.seed} answer {len(type(self).seen)}"
        usage = {"input_tokens": 11, "output_tokens": 3, "total_tokens": 14}
        message = AIMessage(
            text, usage_metadata=usage, response_metadata={"finish_reason": "length"}
        )
        return ChatResult(generations=[ChatGeneration(message=message)])


class TestChatModelBackend:
    def setup_method(self):
        RecordingChatModel.seen = []

    async def test_n_gives_n_distinct_generations(self):
        model = GenericFakeChatModel(messages=iter(["first", "second", "third", "fourth"]))
        backend = ChatModelBackend(model)
        out = await backend.generate(chat(n=3))
        assert sorted(c.text for c in out) == ["first", "second", "third"]
        # invoke() would have kept one generation: the fourth message is still unused.
        assert (await model.ainvoke("x")).content == "fourth"

    async def test_fake_list_model_n_and_raw_prompt(self):
        backend = ChatModelBackend(FakeListChatModel(responses=["x", "y", "z"]))
        out = await backend.generate(GenerationRequest(prompt="hello", sampling=Sampling(n=3)))
        assert sorted(c.text for c in out) == ["x", "y", "z"]
        # No usage metadata: the conservative estimate (1 token per 3 characters).
        assert out[0].prompt_tokens == 2 == backend.count_tokens("hello")
        assert all(c.completion_tokens == 1 for c in out)

    async def test_sampling_fields_seed_stop_and_usage(self):
        backend = ChatModelBackend(RecordingChatModel(responses=["unused"]), context_window=1000)
        request = GenerationRequest(
            messages=(
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Add 2 and 2."},
            ),
            sampling=Sampling(n=3, temperature=0.3, top_p=0.9, max_tokens=40, seed=11, stop=("END",)),
        )
        out = await backend.generate(request)
        seen = RecordingChatModel.seen
        assert len(seen) == 3 and len(out) == 3
        assert {s["temperature"] for s in seen} == {0.3}
        assert {s["top_p"] for s in seen} == {0.9}
        assert {s["max_tokens"] for s in seen} == {40}
        assert {s["stop"][0] for s in seen} == {"END"} and all(len(s["stop"]) == 1 for s in seen)
        # Each sample its own seed, the first one the request's: otherwise n identical samples.
        seeds = sorted(s["seed"] for s in seen)
        assert 11 in seeds and len(set(seeds)) == 3
        assert {derive_seed(11, 1), derive_seed(11, 2)} == set(seeds) - {11}
        messages = seen[0]["messages"]
        assert isinstance(messages[0], SystemMessage) and isinstance(messages[1], HumanMessage)
        assert messages[1].content == "Add 2 and 2."
        assert all(c.prompt_tokens == 11 and c.completion_tokens == 3 for c in out)
        assert all(c.finish_reason == "length" for c in out)
        # The user's model is left as it was.
        assert backend.chat_model.temperature is None and backend.chat_model.seed is None

    async def test_stop_is_applied_even_if_the_model_ignores_it(self):
        backend = ChatModelBackend(FakeListChatModel(responses=["keep this STOP drop this"]))
        out = await backend.generate(chat(stop=("STOP",)))
        assert out[0].text == "keep this "
        assert out[0].finish_reason == "stop"

    async def test_prompt_too_long_and_budget(self):
        backend = ChatModelBackend(FakeListChatModel(responses=["x"]), context_window=10)
        with pytest.raises(PromptTooLongError):
            await backend.generate(chat("a" * 100))
        assert backend.truncate("abcdefghij", 2) == "abcdef"
        assert backend.truncate("abc", 2) == "abc"

    async def test_custom_token_ids_are_used_for_counting(self):
        model = FakeListChatModel(responses=["x"], custom_get_token_ids=lambda t: t.split())
        backend = ChatModelBackend(model)
        assert backend.count_tokens("one two three") == 3
        assert backend.truncate("one two three four", 2) == "one two "

    async def test_lora_is_refused(self):
        backend = ChatModelBackend(FakeListChatModel(responses=["x"]))
        with pytest.raises(BackendError, match="LoRA"):
            await backend.generate(GenerationRequest(prompt="p", lora="adapter"))

    async def test_connection_errors_are_unavailable(self):
        class Down(FakeListChatModel):
            def _generate(self, *args, **kwargs):
                raise ConnectionError("refused")

        backend = ChatModelBackend(Down(responses=["x"]))
        with pytest.raises(BackendUnavailableError, match="refused"):
            await backend.generate(chat())

    def test_rejects_what_is_not_a_chat_model(self):
        with pytest.raises(TypeError, match="BaseChatModel"):
            ChatModelBackend(object())


# ------------------------------------------------------------------ OpenAIBackend


class _FakeServer:
    """An OpenAI-compatible server in a thread: /v1/models, /v1/chat/completions, /v1/completions.

    It answers like vLLM (``max_model_len`` in the model card) unless ``vllm=False``, and records
    every request body.
    """

    def __init__(self, *, vllm: bool = True, max_model_len: int = 512, logprobs: bool = True) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                card: dict[str, Any] = {"id": "served-model", "object": "model", "created": 0}
                card["owned_by"] = "vllm" if vllm else "someone"
                if vllm:
                    card["max_model_len"] = max_model_len
                self._send(200, {"object": "list", "data": [card]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, body))
                if "x" * 50 in json.dumps(body):
                    self._send(400, {"error": {"message": "This model's maximum context length is 512 tokens. However, your prompt contains 900 input tokens.", "type": "BadRequestError", "code": 400}})
                    return
                n = body.get("n", 1)
                texts = [("answer " * (i + 1)).strip() for i in range(n)]
                is_chat = self.path.endswith("/chat/completions")
                choices = []
                for i, text in enumerate(texts):
                    choice: dict[str, Any] = {"index": i, "finish_reason": "stop"}
                    if is_chat:
                        choice["message"] = {"role": "assistant", "content": text}
                    else:
                        choice["text"] = text
                    if body.get("return_token_ids"):
                        choice["token_ids"] = list(range(10 * (i + 1)))
                    if body.get("logprobs") is not None and logprobs:
                        values = [-0.5 * (i + 1)] * len(text.split())
                        if is_chat:  # chat: one entry per token, sampled token first
                            choice["logprobs"] = {"content": [
                                {"token": w, "logprob": v, "bytes": None, "top_logprobs": []}
                                for w, v in zip(text.split(), values, strict=True)
                            ]}  # fmt: skip
                        else:
                            choice["logprobs"] = {
                                "tokens": text.split(), "token_logprobs": values,
                                "top_logprobs": None, "text_offset": [0] * len(values),
                            }  # fmt: skip
                    choices.append(choice)
                self._send(200, {
                    "id": "x", "object": "chat.completion" if is_chat else "text_completion",
                    "created": 0, "model": body["model"], "choices": choices,
                    "usage": {"prompt_tokens": 17, "completion_tokens": 30, "total_tokens": 47},
                })  # fmt: skip

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server():
    servers: list[_FakeServer] = []

    def make(**kwargs: Any) -> _FakeServer:
        servers.append(_FakeServer(**kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


class TestOpenAIBackend:
    async def test_unreachable_url_names_it_and_the_fix(self):
        backend = OpenAIBackend("http://127.0.0.1:9/v1", max_retries=0)
        with pytest.raises(BackendUnavailableError) as err:
            await backend.generate(chat())
        message = str(err.value)
        assert "http://127.0.0.1:9/v1" in message
        assert "vllm serve MODEL --host 127.0.0.1 --port 9" in message
        with pytest.raises(BackendUnavailableError, match="127.0.0.1:9"):
            _ = backend.context_window
        await backend.aclose()

    async def test_lazy_model_and_context_window_from_the_model_card(self, fake_server):
        server = fake_server(max_model_len=512)
        backend = OpenAIBackend(server.url)
        assert backend.model is None and not server.requests
        out = await backend.generate(chat(n=2, temperature=0.5, top_p=0.8, top_k=7, max_tokens=9, seed=3, stop=("END",)))
        assert backend.model == "served-model"
        assert backend.context_window == 512
        path, body = server.requests[0]
        assert path == "/v1/chat/completions"
        assert body["messages"] == [{"role": "user", "content": "What is 2 + 2?"}]
        assert body["model"] == "served-model"
        assert (body["n"], body["temperature"], body["top_p"], body["max_tokens"]) == (2, 0.5, 0.8, 9)
        assert (body["seed"], body["stop"], body["top_k"]) == (3, ["END"], 7)
        assert body["return_token_ids"] is True  # a vLLM server: exact counts
        assert [c.text for c in out] == ["answer", "answer answer"]
        assert [c.completion_tokens for c in out] == [10, 20]
        assert all(c.prompt_tokens == 17 for c in out)
        await backend.aclose()

    async def test_raw_prompt_lora_and_usage_split(self, fake_server):
        server = fake_server(vllm=False)
        backend = OpenAIBackend(server.url, context_window=1000)
        out = await backend.generate(GenerationRequest(prompt="Once", lora="my-adapter", sampling=Sampling(n=3)))
        path, body = server.requests[0]
        assert path == "/v1/completions" and body["prompt"] == "Once"
        assert body["model"] == "my-adapter"  # served with --lora-modules my-adapter=DIR
        assert "return_token_ids" not in body and "top_k" not in body and "seed" not in body
        # No token ids, no tokenizer: usage (30) split by text length (6, 13, 20 characters).
        counts = [c.completion_tokens for c in out]
        assert sum(counts) == 30 and counts == sorted(counts) and counts[0] < counts[2]
        # Estimates without a tokenizer: one token per 3 characters.
        assert backend.count_tokens("abcdefg") == 3
        assert backend.truncate("abcdefghij", 2) == "abcdef"
        await backend.aclose()

    async def test_round_robin_and_failover(self, fake_server):
        a, b = fake_server(), fake_server()
        backend = OpenAIBackend([a.url, "http://127.0.0.1:9/v1", b.url], max_retries=0)
        await asyncio.gather(*(backend.generate(chat(seed=i)) for i in range(6)))
        # Turns 0..5 start at a, dead, b, a, dead, b: the dead replica's turns fall to b.
        assert len(a.requests) == 2 and len(b.requests) == 4
        await backend.aclose()

    async def test_context_length_rejection(self, fake_server):
        backend = OpenAIBackend(fake_server().url)
        with pytest.raises(PromptTooLongError, match="maximum context length is 512"):
            await backend.generate(chat("x" * 60))
        await backend.aclose()

    async def test_unknown_model_is_refused(self, fake_server):
        backend = OpenAIBackend(fake_server().url, model="other")
        with pytest.raises(BackendError, match="does not serve model 'other'"):
            await backend.generate(chat())
        await backend.aclose()

    def test_missing_tokenizer(self, tmp_path):
        with pytest.raises(ModelNotFoundError, match="does not exist"):
            OpenAIBackend(tokenizer=tmp_path / "nope")


# ------------------------------------------------------------------ model resolution, HF planning


def test_nonexistent_model_path(tmp_path):
    from aft_graph.backends import HFBackend

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        HFBackend(tmp_path / "no-such-model")


def test_adapter_dir_is_not_a_model(tmp_path):
    from aft_graph.backends import HFBackend

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="LoRA adapter, not a model"):
        HFBackend(tmp_path)


def test_split_models_are_joined_in_order_and_hash_checked(tmp_path, monkeypatch):
    import hashlib

    from aft_graph.models import EMBEDDED_MODELS, EmbeddedModel, _materialize_gguf

    chunks = [b"GGUF" + bytes(range(50)), b"second part", b"third"]
    for i, chunk in enumerate(chunks, 1):  # importable packages holding data/partNN.bin
        (tmp_path / "site" / f"fake_part{i}" / "data").mkdir(parents=True)
        (tmp_path / "site" / f"fake_part{i}" / "__init__.py").write_text("")
        (tmp_path / "site" / f"fake_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"".join(chunks)
    spec = EmbeddedModel(
        name="Fake", gguf_name="fake.gguf", size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
        parts=tuple((f"fake_part{i}", f"data/part{i:02d}.bin") for i in range(1, 4)), pip="pip install fake",
    )  # fmt: skip
    (tmp_path / "ok").mkdir()
    assert _materialize_gguf(spec, tmp_path / "ok").read_bytes() == whole
    (tmp_path / "bad").mkdir()
    wrong = EmbeddedModel(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(ModelNotFoundError, match="not the official release"):
        _materialize_gguf(wrong, tmp_path / "bad")
    assert list((tmp_path / "bad").iterdir()) == []  # nothing half-made is left behind
    missing = EmbeddedModel(**{**spec.__dict__, "parts": (("no_such_part_pkg", "data/part01.bin"),)})
    with pytest.raises(ModelNotFoundError, match="no_such_part_pkg"):
        missing.part_paths()
    # The teacher is Qwen's own 1.5B release in 22 parts, installed on request only.
    teacher = EMBEDDED_MODELS["teacher"]
    assert len(teacher.parts) == 22 and teacher.size == 1_117_320_768 and len(teacher.sha256) == 64


def _planner(max_batch_size: int):
    from aft_graph.backends.hf import HFBackend

    planner = HFBackend.__new__(HFBackend)  # planning needs no model
    planner.max_batch_size = max_batch_size
    return planner


def _pending(request: GenerationRequest, max_tokens: int | None = None):
    from aft_graph.backends.hf import _Pending

    return _Pending(request, [1, 2, 3], max_tokens or request.sampling.max_tokens, future=None)  # type: ignore[arg-type]


def test_hf_groups_compatible_requests_whatever_their_seed():
    a = [_pending(chat(f"q{i}", seed=i, temperature=0.7)) for i in range(3)]
    hot = _pending(chat("q", temperature=1.0))
    lora = _pending(GenerationRequest(messages=USER, lora="adapter"))
    clamped = _pending(chat("q"), max_tokens=5)  # near the context limit: its own batch
    batches = _planner(16)._plan([a[0], hot, a[1], lora, a[2], clamped])
    assert batches == [[a[0], a[1], a[2]], [hot], [lora], [clamped]]


def test_hf_batches_are_capped_in_sequences():
    reqs = [_pending(chat(f"q{i}", n=3)) for i in range(5)]
    batches = _planner(7)._plan(reqs)
    assert [len(b) for b in batches] == [2, 2, 1]  # 6 sequences fit in 7, 9 would not
    big = _pending(chat(n=20))
    assert _planner(7)._plan([big]) == [[big]]  # too big alone still runs


def test_first_prefix_binary_search():
    from aft_graph.backends.hf import _first_prefix

    assert _first_prefix(10, lambda k: k >= 4) == 4
    assert _first_prefix(10, lambda k: True) == 1
    assert _first_prefix(1, lambda k: True) == 1


# ------------------------------------------------------------------ token log-probabilities


class TestLogprobs:
    async def test_scripted_default_function_and_engine_without(self):
        backend = ScriptedBackend(["a b c", "d e"])
        (plain,) = await backend.generate(chat())
        assert plain.token_logprobs is None and plain.mean_logprob is None
        (first,) = await backend.generate(chat(logprobs=True))
        assert len(first.token_logprobs) == 2 and -2.0 <= first.mean_logprob < 0  # "d e"
        per_word = ScriptedBackend(["x y z"], logprobs=lambda req, i, text: [-1.0, -2.0, -3.0])
        (c,) = await per_word.generate(chat(logprobs=True, max_tokens=2))
        assert c.token_logprobs == (-1.0, -2.0) and c.mean_logprob == -1.5  # cut with the text
        none = ScriptedBackend(["x"], logprobs=False)
        assert not none.supports_logprobs and per_word.supports_logprobs
        with pytest.raises(BackendError, match="without log-probabilities"):
            await none.generate(chat(logprobs=True))

    async def test_chat_model_backend_refuses_clearly(self):
        backend = ChatModelBackend(FakeListChatModel(responses=["hi"]))
        assert not backend.supports_logprobs
        with pytest.raises(BackendError, match="log-probabilities.*VLLMBackend"):
            await backend.generate(chat(logprobs=True))

    async def test_openai_chat_and_completions(self, fake_server):
        server = fake_server()
        backend = OpenAIBackend(server.url)
        out = await backend.generate(chat(n=2, logprobs=True))
        assert server.requests[-1][1]["logprobs"] is True
        assert [c.token_logprobs for c in out] == [(-0.5,), (-1.0, -1.0)]
        raw = await backend.generate(GenerationRequest(prompt="Once", sampling=Sampling(logprobs=True)))
        assert server.requests[-1][1]["logprobs"] == 0  # completions API: sampled token only
        assert raw[0].token_logprobs == (-0.5,)
        (plain,) = await backend.generate(chat())
        assert "logprobs" not in server.requests[-1][1] and plain.token_logprobs is None
        await backend.aclose()

    async def test_openai_server_without_logprobs(self, fake_server):
        server = fake_server(logprobs=False)
        backend = OpenAIBackend(server.url)
        with pytest.raises(BackendError, match="returned no log-probabilities"):
            await backend.generate(chat(logprobs=True))
        await backend.aclose()

    def test_supports_logprobs_helper(self):
        from aft_graph.backends.base import supports_logprobs

        assert supports_logprobs(ScriptedBackend())
        assert not supports_logprobs(ScriptedBackend(logprobs=False))
        assert not supports_logprobs(object())  # a third-party backend that does not say
