"""``aft-graph serve``: an OpenAI-compatible HTTP endpoint whose "models" are strategies.

Any OpenAI client (the ``openai`` package, ``ChatOpenAI``, ``curl``) gets propose-and-aggregate by
naming a strategy as the model (as in optillm)::

    aft-graph serve --model small --port 8080
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "aft-k4-l2", "messages": [{"role": "user", "content": "What is 17 * 23?"}]}'

Endpoints: ``GET /v1/models`` (the strategies offered), ``POST /v1/chat/completions``,
``GET /health``, ``GET /status`` (runs in flight, finished, cancelled, timed out; the engine's
unfinished requests when the backend is an in-process vLLM engine).

Request fields:

- ``model``: a strategy name (:mod:`aft_graph.names`): ``aft`` (K=4, L=1), ``aft-k4-l2``,
  ``rsa`` (N=8, K=4, T=2), ``rsa-n8-k4-t3``, ``sc`` (K=4), ``sc-k8``, ``refine`` (L=1), ``single``.
- ``messages``: the last one is the question; system messages become the proposals' system prompt;
  earlier turns are given as context (:func:`aft_graph.chat_model.conversation_question`).
- ``n`` independent runs (choices), seeded ``seed``, ``seed + 1``, ...; ``max_tokens`` (or
  ``max_completion_tokens``), ``temperature``, ``top_p``, ``stop`` apply to every call of a run
  (proposals and aggregations); without ``seed`` runs are not reproducible.
- Extra body field ``aggregate``: any :class:`~aft_graph.config.AggregateConfig` field, overriding
  the name, e.g. ``{"proposals": 6, "single_final_aggregation": true}``
  (``openai``: ``extra_body={"aggregate": {...}}``).
- Not supported, refused with a 400 that says so: ``tools`` / ``functions``, ``logprobs``,
  ``response_format`` other than text, non-text content parts.

Response: a ``chat.completion`` whose ``usage`` counts **every** call of the run(s): all
proposals and aggregations (prompt and generated tokens), not only the returned text. The extra
field ``aft`` holds per choice the run's usage by role and its layers.

Streaming (``stream: true``) sends Server-Sent Events, each ``data: <chat.completion.chunk>``:

1. a first chunk with ``delta.role = "assistant"``;
2. one chunk per finished layer, **before the answer**, with ``choices: []`` and the extra field
   ``aft_layer``: ``{"choice": i, **LayerEvent}`` (layer, kind, texts, answers, sources, token
   counts, finish reasons, truncation, failures, elapsed_s). Clients that only read ``choices``
   skip it; the ``openai`` client exposes it as ``chunk.model_extra["aft_layer"]``;
3. the answer as a content delta, then a chunk with ``finish_reason``;
4. with ``stream_options: {"include_usage": true}``, a usage chunk (``choices: []``);
5. ``data: [DONE]``.

An error after streaming started is sent as ``data: {"error": {...}}`` (the ``openai`` client
raises it as ``APIError``).

Errors are OpenAI-style ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request
(the message names the fix), 404 for an unknown strategy name, 429 when ``--max-concurrency``
requests are already running (``Retry-After``), 504 after ``--request-timeout`` (not retried by the
``openai`` client: ``x-should-retry: false``), 503 when the engine is unreachable.

A client that disconnects cancels its runs: the graph's tasks are cancelled and with them the
engine requests (vLLM aborts a request whose generator is cancelled; ``OpenAIBackend`` closes the
HTTP request, which ``vllm serve`` aborts in turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from langchain_core.messages import convert_to_messages
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .backends.base import Backend, BackendError, BackendUnavailableError, PromptTooLongError
from .chat_model import conversation_question
from .config import AggregateConfig
from .graph import AggregateContext, build_graph
from .names import MODEL_NAMES, model_name_fields, parse_model_name

__all__ = ["ChatCompletionRequest", "ServeError", "create_app"]

_log = logging.getLogger("aft_graph.serve")

# Fields OpenAI clients send that have no bearing on propose-and-aggregate: accepted, ignored.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key"}
# Fields accepted when left at their neutral value, refused otherwise.
_NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},)}


class ServeError(Exception):
    """An OpenAI-style error answer: HTTP ``status`` and ``{"error": {...}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The part of OpenAI's chat completion request this server honours (plus ``aggregate``)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    n: int = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    aggregate: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None


def _validation_error(exc: ValidationError) -> ServeError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return ServeError(400, f"invalid value for {param!r}: {first['msg']}", param=param)


def _check_supported(req: ChatCompletionRequest) -> None:
    """Refuse what the server cannot honour, saying what to do instead."""
    if req.tools or req.functions or req.tool_choice not in (None, "none") or req.function_call:
        raise ServeError(
            400,
            "tool calling is not supported: propose-and-aggregate returns one free-text answer. "
            "Send the request without 'tools'/'tool_choice', or give your agent a tool-calling "
            "model and call this server (or aft_graph.as_tool) as one of its tools",
            param="tools",
        )
    if req.logprobs or req.top_logprobs:
        raise ServeError(
            400,
            "logprobs are not available: the answer is aggregated from several generations; "
            "remove 'logprobs'",
            param="logprobs",
        )
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise ServeError(
            400,
            "only response_format {'type': 'text'} is supported: remove 'response_format' and ask "
            "for the format in the prompt",
            param="response_format",
        )
    for field, value in (req.model_extra or {}).items():
        if field in _IGNORED:
            continue
        if field in _NEUTRAL and value in _NEUTRAL[field]:
            continue
        if field in _NEUTRAL:
            raise ServeError(400, f"{field} is not supported: remove it or set it to its neutral value", param=field)
        raise ServeError(
            400,
            f"unknown field {field!r}: propose-and-aggregate settings go in the extra body field "
            "'aggregate' (any AggregateConfig field, e.g. {'proposals': 6}); remove the field",
            param=field,
        )
    for i, message in enumerate(req.messages):
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"):
                    raise ServeError(
                        400,
                        "only text content parts are supported: send the message content as a "
                        "string or as {'type': 'text', 'text': ...} parts",
                        param=f"messages.{i}.content",
                    )


def _run_config(req: ChatCompletionRequest, default_max_tokens: int) -> tuple[AggregateConfig, str]:
    """The configuration of the runs a request asks for, and the question."""
    try:
        question, system = conversation_question(convert_to_messages(req.messages))
    except (ValueError, NotImplementedError) as exc:
        raise ServeError(400, str(exc), param="messages") from None
    sampling: dict[str, Any] = {"max_tokens": req.max_completion_tokens or req.max_tokens or default_max_tokens}
    if req.temperature is not None:
        sampling["temperature"] = req.temperature
    if req.top_p is not None:
        sampling["top_p"] = req.top_p
    if req.stop:
        sampling["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    fields: dict[str, Any] = {"proposer": sampling, "aggregator": sampling, "seed": req.seed}
    if system is not None:
        fields["proposal_system"] = system
    overrides = dict(req.aggregate or {})
    for role in ("proposer", "aggregator"):  # a partial role setting keeps the request's sampling
        if isinstance(overrides.get(role), dict):
            overrides[role] = {**sampling, **overrides[role]}
    try:
        named = model_name_fields(req.model)  # a name outside the grammar is a 404, not a 400
    except ValueError as exc:
        raise ServeError(404, str(exc), param="model", code="model_not_found") from None
    try:
        config = AggregateConfig(**{**named, **fields, **overrides})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ServeError(
            400,
            f"invalid setting {where!r} (from the model name, the sampling fields or 'aggregate'): "
            f"{first['msg']}",
            param="aggregate" if where.split(".")[0] in overrides else None,
        ) from None
    except (ValueError, TypeError) as exc:
        raise ServeError(400, str(exc), param="aggregate") from None
    if config.strategy == "best_of_n":
        raise ServeError(
            400, "best_of_n needs a reward function: use the Python API (build_graph(reward_fn=...))",
            param="aggregate",
        )  # fmt: skip
    return config, question


class _Stats(BaseModel):
    in_flight: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0


def _engine_requests(backend: Any) -> int | None:
    """Unfinished requests inside an in-process vLLM engine (``None`` for other backends)."""
    engine = getattr(backend, "engine", None)
    count = getattr(engine, "get_num_unfinished_requests", None)
    return count() if callable(count) else None


def _backend_error(exc: BaseException) -> ServeError:
    if isinstance(exc, PromptTooLongError):
        return ServeError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, BackendUnavailableError):
        return ServeError(503, str(exc), type="server_error", code="engine_unavailable")
    if isinstance(exc, BackendError):
        return ServeError(502, str(exc), type="server_error", code="engine_error")
    if isinstance(exc, ValueError):
        return ServeError(400, str(exc))
    _log.exception("run failed", exc_info=exc)
    return ServeError(500, f"the run failed: {type(exc).__name__}: {exc}", type="server_error")


def create_app(
    backend: Backend | Callable[[], Backend],
    *,
    max_concurrency: int = 4,
    request_timeout: float = 600.0,
    max_tokens: int = 512,
    aggregator_lora: str | None = None,
) -> FastAPI:
    """The OpenAI-compatible application (serve it with uvicorn).

    Args:
        backend: The backend every run uses, or a zero-argument factory that builds it when the
            server starts (an in-process ``VLLMBackend`` must start inside the server's event
            loop); a backend built by the factory is closed when the server stops.
        max_concurrency: Requests running at once; more are answered 429 with ``Retry-After``.
        request_timeout: Seconds a request may run before it is cancelled (504).
        max_tokens: Tokens per call when the request gives no ``max_tokens``.
        aggregator_lora: LoRA adapter (name or directory) for the aggregation calls, e.g. the AFT
            aggregator trained by ``aft-train``.
    """
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency={max_concurrency}: allow at least 1 request at a time")
    if request_timeout <= 0:
        raise ValueError(f"request_timeout={request_timeout}: give a positive number of seconds")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = callable(backend) and not isinstance(backend, Backend)
        app.state.backend = backend() if owned else backend
        try:
            yield
        finally:
            if owned:
                await app.state.backend.aclose()

    app = FastAPI(title="aft-graph", description="Propose-and-aggregate behind OpenAI's chat API.", lifespan=lifespan)
    stats = _Stats()
    context = AggregateContext(aggregator_lora=aggregator_lora)
    graphs: dict[str, Any] = {}

    def graph_for(config: AggregateConfig):
        key = config.model_dump_json()
        if key not in graphs:
            if len(graphs) >= 64:  # many distinct settings: keep the cache bounded
                graphs.pop(next(iter(graphs)))
            graphs[key] = build_graph(app.state.backend, config, name="aft_graph")
        return graphs[key]

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return exc.response()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return {
            **stats.model_dump(),
            "max_concurrency": max_concurrency,
            "engine_requests": _engine_requests(app.state.backend),
        }

    def card(name: str, description: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "aft-graph", "description": description}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card(n, d) for n, d in MODEL_NAMES.items()]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        try:
            config = parse_model_name(name)
        except ValidationError as exc:
            raise ServeError(400, exc.errors()[0]["msg"], param="model") from None
        except ValueError as exc:
            raise ServeError(404, str(exc), param="model", code="model_not_found") from None
        return card(name, MODEL_NAMES.get(name, config.model_dump_json(exclude_none=True)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise ServeError(400, "the request body is not JSON: send a JSON chat completion request") from None
        if not isinstance(body, dict):
            raise ServeError(400, "the request body must be a JSON object")
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        _check_supported(req)
        config, question = _run_config(req, max_tokens)
        if stats.in_flight >= max_concurrency:
            raise ServeError(
                429,
                f"the server is already running {max_concurrency} requests (--max-concurrency): "
                "retry shortly, or start the server with a higher --max-concurrency",
                type="rate_limit_error", code="server_busy", headers={"Retry-After": "1"},
            )  # fmt: skip
        run = _Run(graph_for, config, question, req, context, stats)
        run.start(request, request_timeout)
        if req.stream:
            return EventSourceResponse(run.sse(), headers={"Cache-Control": "no-cache"})
        return await run.result()

    return app


class _Run:
    """The ``n`` graph runs of one request, with disconnect and timeout handling."""

    def __init__(self, graph_for: Callable[[AggregateConfig], Any], config: AggregateConfig,
                 question: str, req: ChatCompletionRequest, context: AggregateContext,
                 stats: _Stats) -> None:  # fmt: skip
        self.graph_for, self.config, self.question, self.req = graph_for, config, question, req
        self.context, self.stats = context, stats
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    def start(self, request: Request, timeout: float) -> None:
        """Start the runs now; the request counts as in flight until they end, however."""
        self.timeout = timeout
        self.stats.in_flight += 1
        self.task = asyncio.create_task(self._all())
        self.watcher = asyncio.create_task(self._watch(request))
        self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.stats.in_flight -= 1
        if task.cancelled():
            self.stats.cancelled += 1
        self.watcher.cancel()
        self.events.put_nowait((-1, None))  # wakes a streaming reader

    async def _watch(self, request: Request) -> None:
        """Cancel the runs as soon as the client goes away (ASGI ``http.disconnect``)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if not self.task.done():
            _log.info("%s: client disconnected, cancelling its runs", self.id)
            self.task.cancel()

    async def _one(self, choice: int) -> dict[str, Any]:
        config = self.config
        if choice and config.seed is not None:  # choice i: seed + i, so the n runs differ
            config = AggregateConfig.model_validate({**config.model_dump(), "seed": config.seed + choice})
        result: dict[str, Any] = {}
        async for mode, chunk in self.graph_for(config).astream(
            {"question": self.question}, stream_mode=["custom", "values"], context=self.context
        ):
            if mode == "custom":
                self.events.put_nowait((choice, chunk))
            else:
                result = chunk
        return result

    async def _all(self) -> list[dict[str, Any]]:
        try:
            async with asyncio.timeout(self.timeout):
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._one(i)) for i in range(self.req.n)]
        except TimeoutError:
            self.stats.timed_out += 1
            raise ServeError(
                504,
                f"the run did not finish within the server's request timeout ({self.timeout:g} s): "
                "ask for fewer proposals/layers or fewer max_tokens, or start the server with a "
                "higher --request-timeout",
                type="timeout_error", code="request_timeout", headers={"x-should-retry": "false"},
            ) from None  # fmt: skip
        except BaseExceptionGroup as group:
            self.stats.failed += 1
            raise _backend_error(group.exceptions[0]) from None
        self.stats.completed += 1
        return [t.result() for t in tasks]

    # ------------------------------------------------------------------ answers

    def _usage(self, results: list[dict[str, Any]]) -> dict[str, int]:
        prompt = sum(r["usage"]["prompt_tokens"] for r in results)
        completion = sum(r["usage"]["completion_tokens"] for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @staticmethod
    def _finish_reason(result: dict[str, Any]) -> str:
        last = result["layers"][-1]
        try:
            return last["finish_reasons"][last["texts"].index(result["answer"])]
        except (ValueError, IndexError):
            return "stop"

    async def result(self) -> JSONResponse:
        try:
            results = await asyncio.shield(self.task)
        except ServeError as exc:
            return exc.response()
        except asyncio.CancelledError:
            if not self.task.cancelled():  # this handler itself is cancelled (shutdown)
                self.task.cancel()
                raise
            # The client disconnected and the runs were cancelled: nobody reads this answer.
            return ServeError(499, "the client closed the request", code="client_closed").response()
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.req.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r["answer"]},
                    "finish_reason": self._finish_reason(r),
                    "logprobs": None,
                }
                for i, r in enumerate(results)
            ],
            "usage": self._usage(results),
            "aft": [{"usage": r["usage"], "layers": r["layers"]} for r in results],
        }
        return JSONResponse(body)

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.req.model, "choices": choices, **extra,
        }  # fmt: skip
        return format_sse_event(data_str=json.dumps(chunk))

    async def sse(self) -> AsyncIterator[str]:
        try:
            yield self._chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                 for i in range(self.req.n)]
            )  # fmt: skip
            while True:
                choice, event = await self.events.get()
                if event is None:
                    break
                yield self._chunk([], aft_layer={"choice": choice, **event.model_dump(mode="json")})
            try:
                results = self.task.result()
            except ServeError as exc:
                yield format_sse_event(data_str=json.dumps(exc.body()))
                yield format_sse_event(data_str="[DONE]")
                return
            for i, r in enumerate(results):
                yield self._chunk([{"index": i, "delta": {"content": r["answer"]}, "finish_reason": None}])
                yield self._chunk([{"index": i, "delta": {}, "finish_reason": self._finish_reason(r)}])
            if self.req.stream_options and self.req.stream_options.include_usage:
                yield self._chunk([], usage=self._usage(results))
            yield format_sse_event(data_str="[DONE]")
        finally:
            # The response is closed (finished, or the client went away): stop the runs.
            if not self.task.done():
                self.task.cancel()
