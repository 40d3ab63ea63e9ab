"""Token estimates for backends that have no tokenizer (a remote chat model, an unknown server).

Conservative on purpose: an estimate that runs high only rejects a prompt that would have fit,
one that runs low lets the server reject it after the work of building it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .base import GenerationRequest

CHARS_PER_TOKEN = 3  # real tokenizers average ~4 characters per token in English
MESSAGE_OVERHEAD = 4  # role markers and separators a chat template adds around each message


def estimate_tokens(text: str) -> int:
    """Tokens ``text`` takes at most, by its length."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def truncate_estimated(text: str, max_tokens: int) -> str:
    """The prefix of ``text`` that :func:`estimate_tokens` counts as ``max_tokens``."""
    return text[: max(max_tokens, 0) * CHARS_PER_TOKEN]


def prompt_tokens(request: GenerationRequest, count: Callable[[str], int]) -> int:
    """Tokens of a request's prompt, its text counted by ``count`` plus each message's markup."""
    if request.prompt is not None:
        return count(request.prompt)
    return sum(count(m["content"]) + MESSAGE_OVERHEAD for m in request.messages or ())
