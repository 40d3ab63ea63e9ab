"""Prompt rendering and token accounting shared by backends that hold a HF tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import GenerationRequest


class TokenizerMixin:
    """Chat templating, counting and truncation with a transformers tokenizer (``self.tokenizer``)."""

    tokenizer: Any

    def render(self, request: GenerationRequest) -> str:
        """The exact prompt text the engine sees (chat template applied for chat requests)."""
        if request.prompt is not None:
            return request.prompt
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(
                "this model's tokenizer has no chat template, so chat `messages` cannot be rendered: "
                "send a raw `prompt` instead, or use an instruct model"
            )
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in request.messages or ()], tokenize=False, add_generation_prompt=True
        )

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        """Token ids of the rendered prompt (a chat template already holds its special tokens)."""
        text = self.render(request)
        add_special = request.prompt is not None
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self.encode_prompt(request))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text
        return self.tokenizer.decode(ids[: max(max_tokens, 0)], skip_special_tokens=True)


def require_model_dir(model: str | Path) -> Path:
    """Resolve a model argument to an existing local directory, or raise a clear error."""
    from ..models import resolve_model

    return resolve_model(model)
