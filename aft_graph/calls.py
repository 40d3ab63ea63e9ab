"""One guarded generation call of the graph, and the errors a run can stop with.

The graph never lets a backend's failure escape as a raw Python error. Every call goes through
:func:`guarded_generate`, which

- bounds it in time: ``AggregateConfig.call_timeout_s`` per call, capped by what is left of the
  run's deadline (``run_timeout_s``); a call past its time is cancelled, which aborts the request in
  the engine (vLLM aborts a cancelled ``AsyncLLM.generate``; an HTTP client closes the
  connection, and ``vllm serve`` aborts a request whose client went away);
- checks the backend's side of the contract (exactly one :class:`Completion` for ``n=1``);
- turns whatever went wrong into a :class:`CallFailure` naming layer, call and cause, which the
  layer records (the layer goes on with the calls that survived).

A layer left with fewer successful calls than ``AggregateConfig.min_survivors`` stops the run with
a :class:`LayerFailedError` that names the layer, the calls and their causes.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Sequence
from typing import Any

from .backends.base import (
    Backend,
    BackendError,
    BackendUnavailableError,
    Completion,
    GenerationRequest,
)

__all__ = [
    "CallFailure",
    "LayerFailedError",
    "LayerUnavailableError",
    "RunClock",
    "check_backend",
    "guarded_generate",
]

_GRAPH_NEEDS = ("generate", "count_prompt_tokens", "truncate", "context_window")


class LayerFailedError(BackendError):
    """A layer kept fewer successful calls than ``AggregateConfig.min_survivors``.

    Attributes:
        layer: Index of the layer (0 = proposals).
        succeeded: Calls of the layer that succeeded.
        calls: Calls the layer made.
        needed: Successful calls the layer needed to go on.
        causes: ``"call i: Error: message"`` for every failed call.
    """

    def __init__(
        self, layer: int, succeeded: int, calls: int, needed: int, causes: Sequence[str], hint: str
    ) -> None:
        self.layer, self.succeeded, self.calls, self.needed = layer, succeeded, calls, needed
        self.causes = list(causes)
        super().__init__(
            f"layer {layer} kept {succeeded} of its {calls} generation calls but needs at least "
            f"{needed} (min_survivors): {'; '.join(self.causes)}. {hint}"
        )


class LayerUnavailableError(LayerFailedError, BackendUnavailableError):
    """A :class:`LayerFailedError` whose every cause was an unreachable or dead engine."""


class CallFailure(Exception):
    """Why one call produced no text: ``cause`` is the ``"Error: message"`` recorded for it."""

    def __init__(self, cause: str, *, unavailable: bool = False) -> None:
        super().__init__(cause)
        self.cause = cause
        self.unavailable = unavailable


def check_backend(backend: Any) -> None:
    """Refuse, at build time, an object the graph cannot generate with.

    Raises:
        TypeError: ``backend`` lacks what the graph calls (names what is missing).
    """
    missing = [name for name in _GRAPH_NEEDS if not hasattr(backend, name)]
    if missing:
        raise TypeError(
            f"build_graph needs a generation backend (aft_graph.backends.Backend), got "
            f"{type(backend).__name__} without {', '.join(missing)}: pass e.g. VLLMBackend('small'), "
            "OpenAIBackend(url) or ScriptedBackend() for tests"
        )
    if not callable(backend.generate):
        raise TypeError(f"{type(backend).__name__}.generate is not callable: it must be async def")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or "(no message)"
    return f"{type(exc).__name__}: {text}"


def _one_completion(result: Any, backend: Backend) -> Completion:
    """The single completion of an ``n=1`` request, or a contract violation."""
    name = type(backend).__name__
    if not isinstance(result, Sequence) or isinstance(result, str | bytes):
        raise CallFailure(
            f"BackendContractError: {name}.generate returned {type(result).__name__}, not a list "
            "of Completion"
        )
    if len(result) != 1:
        raise CallFailure(
            f"BackendContractError: {name}.generate returned {len(result)} completions for a "
            "request with n=1"
        )
    (item,) = result
    if isinstance(item, Completion):
        return item
    try:
        return Completion.model_validate(item)
    except Exception:  # noqa: BLE001 - any shape that is not a completion
        raise CallFailure(
            f"BackendContractError: {name}.generate returned a {type(item).__name__}, not a "
            "Completion(text=..., prompt_tokens=..., completion_tokens=...)"
        ) from None


async def guarded_generate(
    backend: Backend,
    request: GenerationRequest,
    *,
    timeout_s: float | None,
    deadline: float | None,
    attempt: int,
    attempts: int,
) -> Completion:
    """Run one ``n=1`` request within its time; return its completion or raise :class:`CallFailure`.

    A :class:`BackendUnavailableError` before the last of ``attempts`` is re-raised as is, so the
    node's ``RetryPolicy`` tries again; on the last attempt it becomes a failure of the call.

    Args:
        backend: The engine.
        request: One request with ``n=1``.
        timeout_s: Seconds this call may take (``None``: no limit of its own).
        deadline: ``time.monotonic()`` by which the run must be done (``None``: no deadline).
        attempt: This attempt (1-based) and ``attempts`` the most there will be.
        attempts: The most attempts (``AggregateConfig.max_retries``).
    """
    limit = timeout_s
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CallFailure("CallTimeoutError: the run's deadline (run_timeout_s) had passed")
        limit = left if limit is None else min(limit, left)
    try:
        async with asyncio.timeout(limit) as scope:
            result = await backend.generate(request)
    except TimeoutError as exc:
        if scope.expired():
            what = "call_timeout_s" if limit == timeout_s else "the run's deadline (run_timeout_s)"
            raise CallFailure(
                f"CallTimeoutError: no answer within {limit:.3g} s ({what}); the request was "
                "cancelled in the engine"
            ) from exc
        raise CallFailure(_describe(exc)) from exc  # the backend's own TimeoutError
    except BackendUnavailableError as exc:
        if attempt < attempts:
            raise  # transient: the node's RetryPolicy tries again
        raise CallFailure(
            f"{_describe(exc)} (after {attempts} attempts)", unavailable=True
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a custom backend may raise anything; name it
        raise CallFailure(_describe(exc)) from exc
    completion = _one_completion(result, backend)
    if not completion.text.strip():
        raise CallFailure(
            f"EmptyCompletion: the backend returned no text (finish_reason="
            f"{completion.finish_reason!r}, {completion.completion_tokens} tokens); it is left out "
            "so aggregators do not read it"
        )
    return completion


class RunClock:
    """When each graph invocation started, for the per-run deadline (``run_timeout_s``).

    A resumed thread (``ainvoke(None, config)``) is a new invocation and gets a fresh deadline, so
    the start cannot live in the checkpointed state. LangGraph hands every task of one invocation
    the same ``Runtime.stream_writer`` (made per ``astream`` call); the first task that asks
    records the time under it. Entries go when the invocation's writer is garbage-collected.
    """

    def __init__(self) -> None:
        self._starts: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    def started(self, invocation: Any) -> float:
        """``time.monotonic()`` when the invocation identified by ``invocation`` started."""
        now = time.monotonic()
        try:
            return self._starts.setdefault(invocation, now)
        except TypeError:  # not weak-referenceable: no anchor, the deadline counts from now
            return now
