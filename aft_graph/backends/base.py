"""The one async interface every generation engine implements.

A request is chat messages (or a raw prompt) plus sampling; a result is ``n`` completions, each
with its text, token counts and finish reason. The graph, the trainer and the evaluation harness
only ever talk to this interface, so any engine (in-process vLLM, a `vllm serve` fleet,
transformers, a LangChain chat model, a scripted fake) can stand behind them.
"""

from __future__ import annotations

import hashlib
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "Completion",
    "GenerationRequest",
    "PromptTooLongError",
    "Sampling",
    "derive_seed",
    "supports_logprobs",
]

Message = dict[str, str]


class BackendError(RuntimeError):
    """A generation failed for a reason that retrying the same request will not fix."""


class BackendUnavailableError(BackendError):
    """The engine or server could not be reached; retrying later may succeed."""


class PromptTooLongError(BackendError, ValueError):
    """The prompt does not fit the model's context window."""


class Sampling(BaseModel):
    """Sampling parameters of one request.

    Attributes:
        n: Number of completions to return (>= 1).
        temperature: Softmax temperature; 0 means greedy.
        top_p: Nucleus sampling mass in (0, 1].
        top_k: Keep the k most likely tokens; ``None`` or 0 disables it.
        max_tokens: Upper bound on new tokens per completion (>= 1).
        stop: Strings that end a completion (not included in the text).
        seed: Per-request seed; the same seed gives the same completions on the same engine.
        logprobs: Return each generated token's log-probability (``Completion.token_logprobs``),
            for confidence-based selection; engines without them raise ``BackendError``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(1, description="Number of completions to return (>= 1).")
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int = Field(256, description="Maximum new tokens per completion (>= 1).")
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False

    @field_validator("n")
    @classmethod
    def _at_least_one_completion(cls, n: int) -> int:
        if n < 1:
            raise ValueError(f"n={n} asks for no completions: set n to 1 or more")
        return n

    @field_validator("max_tokens")
    @classmethod
    def _room_for_a_token(cls, max_tokens: int) -> int:
        if max_tokens < 1:
            raise ValueError(
                f"max_tokens={max_tokens} leaves no room to generate: set max_tokens to 1 or more"
            )
        return max_tokens


class GenerationRequest(BaseModel):
    """What to generate from: chat ``messages`` or a raw ``prompt`` (exactly one), plus sampling.

    Attributes:
        messages: OpenAI-style chat messages ``{"role": ..., "content": ...}``; the backend applies
            the model's chat template.
        prompt: A raw text prompt, sent as is (base models, few-shot prompts).
        sampling: Sampling parameters.
        lora: Name or directory of a LoRA adapter to apply to this request only (backends that
            serve adapters: vLLM in-process, ``vllm serve --lora-modules``, HF with peft).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    messages: tuple[Message, ...] | None = None
    prompt: str | None = None
    sampling: Sampling = Sampling()
    lora: str | None = None

    @model_validator(mode="after")
    def _exactly_one_input(self) -> GenerationRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` (chat) or `prompt` (raw text)")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("`messages` is empty: give at least one chat message")
            for m in self.messages:
                if "role" not in m or "content" not in m:
                    raise ValueError(
                        f"chat message {m!r} needs 'role' and 'content' keys, "
                        "e.g. {'role': 'user', 'content': '...'}"
                    )
        return self


class Completion(BaseModel):
    """One generated text with its token accounting."""

    model_config = ConfigDict(frozen=True)

    text: str
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    finish_reason: Literal["stop", "length", "error"] | str = "stop"
    # Prompt tokens the engine took from its prefix cache instead of computing (vLLM reports it;
    # 0 where the engine does not say). prompt_tokens - cached_prompt_tokens were prefilled.
    cached_prompt_tokens: int = Field(0, ge=0)
    # Log-probability of each generated token under the model (before temperature / top-p), when
    # the request asked for them (Sampling.logprobs) and the engine has them; None otherwise.
    token_logprobs: tuple[float, ...] | None = None

    @property
    def mean_logprob(self) -> float | None:
        """Mean log-probability of the generated tokens (``None`` without log-probabilities)."""
        if self.token_logprobs is None:
            return None
        if not self.token_logprobs:
            return float("-inf")
        return sum(self.token_logprobs) / len(self.token_logprobs)


@runtime_checkable
class Backend(Protocol):
    """The async generation interface.

    Implementations batch concurrent calls themselves (vLLM continuous batching, HF micro-batches),
    so callers simply ``await`` many ``generate`` calls at once.
    """

    @property
    def context_window(self) -> int:
        """Maximum prompt + completion tokens the model accepts."""
        ...

    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` takes (without special tokens)."""
        ...

    def truncate(self, text: str, max_tokens: int) -> str:
        """``text`` cut to at most ``max_tokens`` tokens (unchanged if it fits)."""
        ...

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens of the prompt the engine will see (chat template applied)."""
        ...

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        """Return ``request.sampling.n`` completions."""
        ...

    async def aclose(self) -> None:
        """Release the engine (processes, sockets, memory)."""
        ...


def supports_logprobs(backend: object) -> bool:
    """Whether ``backend`` returns token log-probabilities when ``Sampling.logprobs`` is set.

    Backends say so with a ``supports_logprobs`` attribute; one without it is assumed not to.
    """
    return bool(getattr(backend, "supports_logprobs", False))


def derive_seed(base: int | None, *parts: object) -> int | None:
    """A stable 31-bit seed from a base seed and any labels (layer, index, ...).

    Python's ``hash`` is salted per process, so a digest is used to keep runs reproducible.
    """
    if base is None:
        return None
    key = "/".join(str(p) for p in (base, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little") & 0x7FFFFFFF


def check_fits(prompt_tokens: int, sampling: Sampling, context_window: int) -> int:
    """Validate a prompt against the context window; return the max_tokens that fits.

    The completion budget is clamped so prompt + completion never exceeds the window (engines
    reject such requests outright); a prompt that leaves no room raises ``PromptTooLongError``.
    """
    room = context_window - prompt_tokens
    if room < 1:
        raise PromptTooLongError(
            f"prompt is {prompt_tokens} tokens but the model's context window is {context_window}: "
            "shorten the prompt (or the proposals' token budget) or start the engine with a larger "
            "max_model_len"
        )
    return min(sampling.max_tokens, room)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop string; return (text, whether a stop string was found)."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
