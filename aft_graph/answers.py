"""Final-answer extraction and voting.

Answers are pulled from ``<answer>...</answer>`` tags, LaTeX ``\\boxed{...}`` or the last line of
plain text. Votes group answers that are *equivalent*, not only equal: math answers are compared
with math-verify (``1/2`` equals ``0.5`` equals ``\\frac{1}{2}``), anything else by normalized text.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

__all__ = [
    "AnswerFormat",
    "Vote",
    "answers_match",
    "extract_answer",
    "group_answers",
    "majority_vote",
    "normalize_text",
]

AnswerFormat = Literal["auto", "boxed", "tag", "text"]

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def normalize_text(text: str) -> str:
    """Lower-case, strip markup-ish wrapping and trailing punctuation, collapse whitespace."""
    text = text.strip().strip("$`*\"' ").rstrip(".。!").strip()
    return re.sub(r"\s+", " ", text).lower()


def extract_answer(text: str, fmt: AnswerFormat = "auto") -> str | None:
    """The final answer stated in ``text``, or ``None`` if it states none in that format.

    Args:
        text: A model completion.
        fmt: ``"tag"`` (last ``<answer>`` tag), ``"boxed"`` (last ``\\boxed{}``), ``"text"`` (the last
            non-empty line) or ``"auto"`` (tag, then boxed, then last line).
    """
    if fmt in ("tag", "auto"):
        tags = _TAG.findall(text)
        if tags:
            return tags[-1].strip()
        if fmt == "tag":
            return None
    if fmt in ("boxed", "auto"):
        boxed = _last_boxed(text)
        if boxed is not None or fmt == "boxed":
            return boxed
    lines = [line for line in text.strip().splitlines() if line.strip()]
    # A last line of markup only (a closing ``` fence) states nothing: not an empty-string answer
    # that every such text would "agree" on.
    return (normalize_text(lines[-1]) if lines else "") or None


def _math_timeout() -> int | None:
    # math-verify's timeout uses SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def _parse_math(answer: str) -> tuple:
    from math_verify import parse

    wrapped = answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"
    try:
        return tuple(parse(wrapped, parsing_timeout=_math_timeout()))
    except Exception:  # noqa: BLE001 - an unparsable answer just is not math
        return ()


def answers_match(a: str | None, b: str | None) -> bool:
    """Whether two extracted answers are the same answer (math-equivalent or equal as text)."""
    if a is None or b is None:
        return False
    if normalize_text(a) == normalize_text(b):
        return True
    pa, pb = _parse_math(a), _parse_math(b)
    if not pa or not pb:
        return False
    from math_verify import verify

    try:
        return bool(verify(list(pa), list(pb), timeout_seconds=_math_timeout()))
    except Exception:  # noqa: BLE001
        return False


@dataclass(frozen=True)
class Vote:
    """The outcome of a majority vote.

    Attributes:
        answer: The winning answer (``None`` if no candidate stated one).
        index: Index of the first candidate that gave it (its text is the representative).
        count: How many candidates agreed with it.
        total: How many candidates stated an answer at all.
    """

    answer: str | None
    index: int | None
    count: int
    total: int


def group_answers(answers: Sequence[str | None]) -> list[list[int]]:
    """Indices of equivalent answers, grouped (:func:`answers_match`), groups in order of first
    appearance; ``None`` (no answer stated) is in no group."""
    groups: list[list[int]] = []
    for i, ans in enumerate(answers):
        if ans is None:
            continue
        for group in groups:
            if answers_match(answers[group[0]], ans):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def majority_vote(answers: Sequence[str | None]) -> Vote:
    """Group equivalent answers and return the largest group (ties: the earliest)."""
    groups = group_answers(answers)
    total = sum(len(g) for g in groups)
    if not groups:
        return Vote(None, None, 0, 0)
    best = max(groups, key=len)  # max keeps the first of equal-length groups
    return Vote(answers[best[0]], best[0], len(best), total)
