"""ChatModelBackend: any langchain-core chat model (``BaseChatModel``) as a generation backend.

Useful to aggregate with a hosted model (``ChatOpenAI``, ``ChatAnthropic``, ...) or any model a
LangChain integration wraps. Two things need care:

- ``n`` samples: ``BaseChatModel.invoke`` keeps only the first generation, so the backend asks
  for ``n`` generations of the same messages in one ``agenerate`` call (run concurrently) and
  takes the first generation of each.
- Sampling parameters are model fields, named differently per integration: temperature, top_p,
  top_k, the token limit (``max_tokens``, ``max_output_tokens``, ``num_predict``...) and seed are
  set on a copy of the model (``model_copy(update=...)``), only for fields the model class has.
  With a seed, sample ``i`` gets its own seed derived from it (sample 0 keeps the seed itself):
  ``n`` calls with one seed would return ``n`` identical samples.

Token counts come from the messages' ``usage_metadata`` when the provider reports it. Otherwise
(and for :meth:`ChatModelBackend.count_tokens` / :meth:`ChatModelBackend.truncate`, since there is
no local tokenizer) the model's ``custom_get_token_ids`` is used if set, else a conservative
estimate of one token per 3 characters.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ._estimate import estimate_tokens, prompt_tokens, truncate_estimated
from .base import (
    BackendError,
    BackendUnavailableError,
    Completion,
    GenerationRequest,
    check_fits,
    cut_at_stop,
    derive_seed,
)

__all__ = ["ChatModelBackend"]

# Our sampling field -> the model fields that mean it, by integration (first present wins).
_FIELDS: dict[str, tuple[str, ...]] = {
    "temperature": ("temperature",),
    "top_p": ("top_p",),
    "top_k": ("top_k",),
    "max_tokens": ("max_tokens", "max_output_tokens", "num_predict", "max_new_tokens"),
}


class ChatModelBackend:
    """Generate with a langchain-core chat model.

    Args:
        chat_model: Any ``BaseChatModel`` (``ChatOpenAI``, ``ChatAnthropic``, a fake model...).
        context_window: Prompt + completion tokens the model accepts (LangChain does not expose
            it); prompts are checked against it with the token estimate described above.

    ``GenerationRequest.lora`` is not supported (a chat model is one fixed model): use
    ``VLLMBackend``, ``OpenAIBackend`` (``vllm serve --lora-modules``) or ``HFBackend``.
    """

    supports_logprobs = False  # LangChain chat models expose them unevenly

    def __init__(self, chat_model: Any, *, context_window: int = 8192) -> None:
        from langchain_core.language_models import BaseChatModel

        if not isinstance(chat_model, BaseChatModel):
            raise TypeError(
                f"ChatModelBackend needs a langchain-core BaseChatModel, got {type(chat_model).__name__}"
            )
        self.chat_model = chat_model
        self._context_window = context_window
        self._fields = set(type(chat_model).model_fields)

    @property
    def context_window(self) -> int:
        return self._context_window

    def count_tokens(self, text: str) -> int:
        token_ids = getattr(self.chat_model, "custom_get_token_ids", None)
        if token_ids is not None:
            return len(token_ids(text))
        return estimate_tokens(text)

    def truncate(self, text: str, max_tokens: int) -> str:
        if self.count_tokens(text) <= max_tokens:
            return text
        if getattr(self.chat_model, "custom_get_token_ids", None) is None:
            return truncate_estimated(text, max_tokens)
        # Only ids are known, not how to decode them: find the longest prefix that fits.
        lo, hi = 0, len(text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.count_tokens(text[:mid]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        return text[:lo]

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return prompt_tokens(request, self.count_tokens)

    def _messages(self, request: GenerationRequest) -> list[Any]:
        from langchain_core.messages import HumanMessage, convert_to_messages

        if request.prompt is not None:
            return [HumanMessage(request.prompt)]
        return convert_to_messages([dict(m) for m in request.messages or ()])

    def _models(self, request: GenerationRequest, max_tokens: int) -> list[Any]:
        """The model to call for each sample (copies carrying the sampling fields it has)."""
        s = request.sampling
        wanted = dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=max_tokens)
        update: dict[str, Any] = {}
        for ours, names in _FIELDS.items():
            field = next((f for f in names if f in self._fields), None)
            if field is not None and wanted[ours] is not None:
                update[field] = wanted[ours]
        if s.seed is None or "seed" not in self._fields:
            # One model for every sample; left uncopied when nothing changes, so models with
            # state (scripted fakes) keep it.
            model = self.chat_model.model_copy(update=update) if update else self.chat_model
            return [model] * s.n
        return [
            self.chat_model.model_copy(update={**update, "seed": s.seed if i == 0 else derive_seed(s.seed, i)})
            for i in range(s.n)
        ]

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        if request.sampling.logprobs:
            raise BackendError(
                "ChatModelBackend does not return token log-probabilities (LangChain chat models "
                "expose them unevenly): use VLLMBackend, OpenAIBackend or HFBackend for "
                "confidence-based selection, or choose select='majority'/'usc'"
            )
        if request.lora is not None:
            raise BackendError(
                "ChatModelBackend cannot apply LoRA adapters: serve the adapter with vLLM "
                "(VLLMBackend, or OpenAIBackend over `vllm serve --lora-modules`) or use HFBackend"
            )
        s = request.sampling
        estimate = self.count_prompt_tokens(request)
        max_tokens = check_fits(estimate, s, self.context_window)
        messages = self._messages(request)
        models = self._models(request, max_tokens)
        stop = list(s.stop) or None
        try:
            if all(m is models[0] for m in models):
                result = await models[0].agenerate([messages] * s.n, stop=stop)
                generations = [g[0] for g in result.generations]
            else:
                results = await asyncio.gather(*(m.agenerate([messages], stop=stop) for m in models))
                generations = [r.generations[0][0] for r in results]
        except BackendError:
            raise
        except (ConnectionError, TimeoutError) as exc:
            raise BackendUnavailableError(f"the chat model could not be reached: {exc!r}") from exc
        except Exception as exc:
            raise BackendError(f"the chat model failed: {exc!r}") from exc
        return [self._completion(g, estimate, s.stop) for g in generations]

    def _completion(self, generation: Any, estimate: int, stop: tuple[str, ...]) -> Completion:
        message = generation.message
        content = message.content if isinstance(message.content, str) else generation.text
        # Providers honour `stop` themselves; fakes and some integrations ignore it.
        text, stopped = cut_at_stop(content, stop)
        usage = getattr(message, "usage_metadata", None) or {}
        info = {**(generation.generation_info or {}), **(message.response_metadata or {})}
        finish = info.get("finish_reason") or info.get("stop_reason") or info.get("done_reason")
        if stopped or finish in (None, "end_turn", "stop_sequence", "STOP"):
            finish = "stop"
        elif finish in ("max_tokens", "MAX_TOKENS"):
            finish = "length"
        return Completion(
            text=text,
            prompt_tokens=usage.get("input_tokens", estimate),
            completion_tokens=usage.get("output_tokens", self.count_tokens(text)),
            finish_reason=str(finish),
        )

    async def aclose(self) -> None:
        """Nothing to release: the chat model owns its clients."""
