"""ScriptedBackend: a deterministic, instant backend for unit tests.

It records every request it receives (``calls``), so tests can pin the graph's topology: how many
proposer and aggregator calls ran and exactly which proposals each aggregator prompt held.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from typing import Literal

from .base import (
    BackendError,
    BackendUnavailableError,
    Completion,
    GenerationRequest,
    check_fits,
    cut_at_stop,
)

__all__ = ["ScriptedBackend"]

Responder = Callable[[GenerationRequest, int], str]
LogprobFn = Callable[[GenerationRequest, int, str], "float | Sequence[float]"]
"""``(request, sample_index, text) -> one value for every token, or one per token``."""


def _default_logprobs(request: GenerationRequest, sample: int, text: str) -> float:
    """A reproducible per-text confidence in [-2, 0), the same for the same text."""
    value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=2).digest(), "little")
    return -2.0 * (value + 1) / 65536


def _default_responder(request: GenerationRequest, sample: int) -> str:
    """A reproducible answer that depends on the prompt, the seed and the sample index."""
    key = f"{request.messages or request.prompt}|{request.sampling.seed}|{sample}".encode()
    value = int.from_bytes(hashlib.blake2b(key, digest_size=2).digest(), "little") % 7
    return f"Working it out step by step. The answer is \\boxed{{{value}}}."


class ScriptedBackend:
    """A fake engine: text comes from a responder function or a fixed script.

    Tokens are whitespace-separated words, so token accounting is easy to check by hand.

    Args:
        responses: ``None`` (a seeded deterministic default), a function
            ``(request, sample_index) -> text``, or a list of texts handed out in call order
            (cycled).
        context_window: Pretended context window in words.
        delay: Seconds each call sleeps, to let concurrency show in tests.
        fail: Optional predicate; a request for which it is true raises
            ``BackendUnavailableError`` (to test retries, failures and resume).
        logprobs: Token log-probabilities returned when a request asks for them
            (``Sampling.logprobs``): ``None`` (a reproducible value per text), a function
            ``(request, sample_index, text) -> value or one value per word``, or ``False`` to play
            an engine that has none (such requests raise ``BackendError``).

    Attributes:
        calls: Every request received, in order of arrival.
    """

    def __init__(
        self,
        responses: Responder | Sequence[str] | None = None,
        *,
        context_window: int = 4096,
        delay: float = 0.0,
        fail: Callable[[GenerationRequest], bool] | None = None,
        logprobs: LogprobFn | Literal[False] | None = None,
    ) -> None:
        if responses is None:
            self._responder: Responder = _default_responder
        elif callable(responses):
            self._responder = responses
        else:
            script = list(responses)
            if not script:
                raise ValueError("ScriptedBackend needs at least one scripted response")
            counter = iter(range(1 << 62))
            self._responder = lambda _req, _i: script[next(counter) % len(script)]
        self._context_window = context_window
        self.delay = delay
        self.fail = fail
        self.supports_logprobs = logprobs is not False
        self._logprobs: LogprobFn | None = (
            None if logprobs is False else logprobs or _default_logprobs
        )
        self.calls: list[GenerationRequest] = []
        self.closed = False

    @property
    def context_window(self) -> int:
        return self._context_window

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def truncate(self, text: str, max_tokens: int) -> str:
        words = text.split()
        return text if len(words) <= max_tokens else " ".join(words[:max_tokens])

    def render(self, request: GenerationRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        return "\n".join(f"{m['role']}: {m['content']}" for m in request.messages or ())

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return self.count_tokens(self.render(request))

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        self.calls.append(request)
        if request.sampling.logprobs and self._logprobs is None:
            raise BackendError("this ScriptedBackend plays an engine without log-probabilities")
        prompt_tokens = self.count_prompt_tokens(request)
        max_tokens = check_fits(prompt_tokens, request.sampling, self.context_window)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None and self.fail(request):
            raise BackendUnavailableError("scripted failure")
        out = []
        for i in range(request.sampling.n):
            text, stopped = cut_at_stop(self._responder(request, i), request.sampling.stop)
            words = text.split()
            finish = "stop"
            if len(words) > max_tokens:
                text, finish = " ".join(words[:max_tokens]), "length"
            tokens = min(len(words), max_tokens)
            token_logprobs = None
            if request.sampling.logprobs and self._logprobs is not None:
                value = self._logprobs(request, i, text)
                values = [float(value)] * tokens if isinstance(value, int | float) else list(value)
                token_logprobs = tuple(values[:tokens])
            out.append(
                Completion(
                    text=text,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=tokens,
                    finish_reason=finish if not stopped else "stop",
                    token_logprobs=token_logprobs,
                )
            )
        return out

    async def aclose(self) -> None:
        self.closed = True
