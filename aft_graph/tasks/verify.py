"""Verifiers: how a response to a task is scored, for evaluation and for training data alike.

:func:`check_answer` grades an extracted answer (reasoning-gym's own ``score_answer``, math-verify
equivalence, normalized equality or containment); :func:`score` reads the answer from a full
response first (or runs the code, for HumanEval). :class:`Verifier` is the same check with a
chosen way of reading the answer (strict tags, or leniently the last number stated), which the
trainer uses to select proposals and accept aggregation targets.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
from collections.abc import Callable, Sequence
from functools import lru_cache

from ..answers import AnswerFormat, answers_match, extract_answer, normalize_text
from .code import extract_code, program_key, run_humaneval
from .task import SupportsTask, Task, as_task

__all__ = ["Verifier", "ascore", "check_answer", "proxy_reward", "score", "vote_key"]


def check_answer(task: Task | SupportsTask, answer: str | None) -> float:
    """Grade an answer already read from a response: 1.0 correct, 0.0 wrong or missing
    (reasoning-gym may give partial credit).

    Raises:
        ValueError: An unknown task kind, or a HumanEval task (run its code with :func:`score`).
    """
    task = as_task(task)
    if task.kind not in _KINDS:
        raise ValueError(f"task {task.id!r} has unknown kind {task.kind!r}")
    if task.kind == "humaneval":
        raise ValueError(f"task {task.id!r} is code: score the whole response with score()")
    if answer is None:
        return 0.0
    if task.kind == "reasoning_gym":
        meta = task.metadata
        ds = _rg_dataset(meta["dataset"], json.dumps(meta.get("config", {}), sort_keys=True))
        try:
            return float(ds.score_answer(answer, meta["entry"]))
        except Exception:  # noqa: BLE001 - a malformed answer some scorers choke on is just wrong
            return 0.0
    if task.kind == "math":
        return float(answers_match(answer, task.reference))
    if task.kind == "exact":
        return float(normalize_text(answer) == normalize_text(task.reference))
    return float(normalize_text(task.reference) in normalize_text(answer))  # contains


_KINDS = ("reasoning_gym", "math", "exact", "contains", "humaneval")


@lru_cache(maxsize=64)
def _rg_dataset(dataset: str, config_json: str):
    # score_answer may read the dataset's config (tolerances, formats): rebuild it as generated.
    import reasoning_gym

    return reasoning_gym.create_dataset(dataset, size=1, seed=0, **json.loads(config_json))


def score(task: Task | SupportsTask, text: str) -> float:
    """Score a response to ``task``: 1.0 correct, 0.0 wrong (reasoning-gym may give partial credit).

    Args:
        task: The task.
        text: The model's full response.

    Returns:
        A score in ``[0, 1]``.
    """
    task = as_task(task)
    if task.kind == "humaneval":
        return float(run_humaneval(task, text)["passed"])
    answer = extract_answer(text, "auto")
    if task.kind == "contains" and answer is None:
        answer = text  # the reference may occur in an untagged response
    return check_answer(task, answer)


async def ascore(task: Task, text: str) -> float:
    """:func:`score` without blocking the event loop while code runs (HumanEval)."""
    if task.kind == "humaneval":
        return await asyncio.to_thread(score, task, text)
    # math-verify's timeouts use SIGALRM, which only the main thread may set: score inline.
    return score(task, text)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class Verifier:
    """Scores a response to a task with :func:`check_answer`, reading the answer its own way.

    Tasks that name a reasoning-gym data set are scored by that data set's ``score_answer`` (in
    [0, 1]); others with a reference answer by math-verify equivalence (1 or 0).

    Args:
        answer_format: Where the answer is in a response (see ``aft_graph.answers``).
        threshold: Minimum score for :meth:`accepts`.
        last_number: When the response has no ``<answer>`` tag and no ``\\boxed{}``, take the last
            number it states as its answer (lenient; for numeric tasks and weak models that
            rarely follow the format instruction).
    """

    name = "verifier"

    def __init__(
        self, answer_format: AnswerFormat = "auto", threshold: float = 1.0, *, last_number: bool = False
    ) -> None:
        self.answer_format = answer_format
        self.threshold = threshold
        self.last_number = last_number

    def extract(self, text: str) -> str | None:
        """The answer the verifier reads from ``text``."""
        if self.last_number:
            strict = extract_answer(text, "tag")
            if strict is None:
                strict = extract_answer(text, "boxed")
            if strict is not None:
                return strict
            numbers = _NUMBER.findall(text)
            return numbers[-1] if numbers else None
        return extract_answer(text, self.answer_format)

    def score(self, task: Task | SupportsTask, text: str) -> float:
        """Score of ``text`` as an answer to ``task`` (0 when it states no answer)."""
        answer = self.extract(text)
        if answer is None:
            return 0.0
        return check_answer(task, answer)

    def accepts(self, task: Task | SupportsTask, text: str) -> bool:
        """Whether the score reaches the threshold."""
        return self.score(task, text) >= self.threshold


# ------------------------------------------------------------------------- voting and best-of-n


def vote_key(task: Task, text: str, answer: str | None) -> str | None:
    """What two responses must share to count as the same vote.

    The extracted answer for answer-type tasks; the code with blank lines and comments removed for
    HumanEval (exact grouping, since equivalent programs cannot be recognized without running them).
    """
    if task.kind != "humaneval":
        return answer
    return program_key(text, task.metadata["entry_point"])


def proxy_reward(tasks: Sequence[Task]) -> Callable[[str, str], float]:
    """A verifier-free reward for best-of-N: does the response follow the required format?

    It never looks at the reference or runs the tests. Score = 1 if the response states an answer in
    the requested form (``<answer>`` tags or ``\\boxed{}``; for HumanEval: a code block that parses
    and defines the entry point), else 0, minus a length penalty of 1e-5 per character so that
    among well-formed responses the shortest wins (rambling is the usual failure of small models).

    Args:
        tasks: The tasks being evaluated (the reward is looked up by question text).

    Returns:
        ``reward(question, text) -> float`` for ``build_graph(..., reward_fn=...)``.
    """
    by_question = {t.question.strip(): t for t in tasks}

    def reward(question: str, text: str) -> float:
        task = by_question.get(question.strip())
        return _well_formed(task, text) - 1e-5 * len(text)

    return reward


def _well_formed(task: Task | None, text: str) -> float:
    if task is not None and task.kind == "humaneval":
        code = extract_code(text, task.metadata["entry_point"])
        try:
            tree = ast.parse(code)
        except SyntaxError:
            return 0.0
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        return float(task.metadata["entry_point"] in names)
    fmt = "boxed" if task is not None and task.kind == "math" else "tag"
    found = extract_answer(text, fmt) is not None or extract_answer(text, "boxed") is not None
    return float(found)
