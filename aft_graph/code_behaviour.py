"""Consensus for code by what programs *do*: run the candidates, group by behaviour, vote.

(Over 400 lines: example parsing, the sandboxed runner and the behaviour vote; the sandbox
should move next to the evaluation's in aft_graph/tasks/code.py — a follow-up.)

A vote over program texts only groups identical programs, so on code it picks little better than
one sample, although the right program is usually among the candidates. Here each candidate is
run, in a separate resource-limited Python process, on

- the examples *stated in the question* (doctest lines ``>>> f(1)`` / ``2`` and lines such as
  ``f(1) == 2`` or ``f(1) ➞ 2`` in the function's docstring), which also tell whether the candidate
  gives the stated result, and
- optionally, inputs *the model proposes* (:func:`input_request_messages`,
  :func:`parse_proposed_calls`), whose results are compared between candidates only.

Candidates that return the same outputs on every input form one behaviour group; the group that
passes the most stated examples wins, then the larger group (:func:`behaviour_vote`).
:func:`behaviour_notes` says the same thing to an aggregator, one note per candidate.

Only what the question states (and the model proposes) is used: never a benchmark's hidden tests.

Model-written code runs on this machine. The limits (address space, CPU time, file size, wall time,
its own process group) stop runaway loops and memory hogs, not a hostile program: run untrusted
models inside a container or VM.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import doctest
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .tasks.code import defines, extract_code

__all__ = [
    "BehaviourVote",
    "CandidateRun",
    "CodeProblem",
    "Example",
    "abehaviour_vote",
    "behaviour_notes",
    "behaviour_vote",
    "input_request_messages",
    "parse_proposed_calls",
    "run_candidate",
]

Message = dict[str, str]

# Fenced code blocks (as aft_graph.tasks.code reads responses), for the question's stub and the
# model's proposed calls.
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
# "f(1, 2) == 3", "f(1) ➞ 3", "f(1) -> 3", "f(1) => 3", "f(1) should return 3"
_ARROW = re.compile(r"^\s*(==>|==|➞|->|=>|→|should\s+return|returns?)\s*(.+?)\s*$", re.I)
# "For lst = [1, 2] the output should be 3" (one-argument functions)
_FOR_OUTPUT = re.compile(r"^\s*for\s+\w+\s*=\s*(.+?),?\s+the\s+output\s+should\s+be\s+(.+?)\s*$", re.I)
_LITERAL_NAMES = {"true": "True", "false": "False", "none": "None"}


@dataclass(frozen=True)
class Example:
    """One call and, for stated examples, the expected result (both Python source)."""

    call: str
    expected: str | None = None


@dataclass(frozen=True)
class CodeProblem:
    """A function to write: the stub the question gives, its name and its stated examples.

    Attributes:
        stub: The question's code (imports, helper functions, the signature and docstring); put
            before each candidate so helpers and imports the question defines are available.
        entry_point: The function the candidates must define.
        examples: Examples stated in the docstring, with expected results.
    """

    stub: str
    entry_point: str
    examples: tuple[Example, ...] = ()

    @classmethod
    def from_question(cls, question: str, entry_point: str | None = None) -> CodeProblem | None:
        """Read the problem from a question holding a code stub (```python block or bare code).

        Args:
            question: The question text.
            entry_point: The function to write; by default the last top-level function the
                question's code defines (HumanEval's helpers come before the entry point).

        Returns:
            The problem, or ``None`` if the question holds no parsable function.
        """
        blocks = [b for b in _FENCE.findall(question) if b.strip()] or [question]
        for stub in reversed(blocks):
            tree = _parse_stub(stub)
            if tree is None:
                continue
            functions = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
            names = [f.name for f in functions]
            name = entry_point or (names[-1] if names else None)
            if name is None or name not in names:
                continue
            node = functions[names.index(name)]
            docstring = ast.get_docstring(node) or ""
            return cls(stub=stub, entry_point=name, examples=tuple(stated_examples(docstring, name)))
        return None

    def program(self, text: str) -> str | None:
        """The candidate's code made runnable after the stub, or ``None`` if it has none."""
        code = extract_code(text, self.entry_point)
        if not code.strip():
            return None
        if defines(code, self.entry_point):
            # A whole function: the stub first (imports, helpers), its empty body completed; the
            # candidate's definition then replaces it.
            return f"{self.stub.rstrip()}\n    pass\n\n{code}"
        first = next(line for line in code.splitlines() if line.strip())
        if not first[:1].isspace():
            return None  # neither the function nor an indented body continuing the signature
        return self.stub + code


def _parse_stub(stub: str) -> ast.Module | None:
    # A HumanEval stub ends after the docstring: give the function an empty body to parse it.
    for candidate in (stub, stub.rstrip() + "\n    pass\n"):
        try:
            return ast.parse(candidate)
        except SyntaxError:
            continue
    return None


def _is_expression(source: str) -> bool:
    try:
        ast.parse(source, mode="eval")
    except SyntaxError:
        return False
    return True


def _call_prefix(line: str, entry_point: str) -> str | None:
    """The ``entry_point(...)`` call a line starts with (parentheses balanced), if any."""
    line = line.strip()
    if not line.startswith(f"{entry_point}("):
        return None
    depth, quote = 0, None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote and line[i - 1] != "\\":
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return line[: i + 1]
    return None


def _clean_expected(source: str) -> str | None:
    """A stated result as a Python expression, or ``None`` if it is not one."""
    source = source.strip().rstrip(".")
    if " = " in source:  # "19 - 5 - 6 = 8": the worked example ends with the result
        source = source.rsplit(" = ", 1)[1].strip()
    source = _LITERAL_NAMES.get(source.lower(), source)
    return source if _is_expression(source) and _only_known_names(source, set()) else None


def _only_known_names(source: str, allowed: set[str]) -> bool:
    """Whether every free name in ``source`` is a builtin or in ``allowed`` (``f(abc)`` is prose)."""
    import builtins

    tree = ast.parse(source, mode="eval")
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return all(hasattr(builtins, n) or n in allowed for n in names)


def stated_examples(docstring: str, entry_point: str) -> list[Example]:
    """Examples a docstring states for ``entry_point``: doctests and ``f(x) == y``-style lines."""
    examples: list[Example] = []
    seen: set[str] = set()

    def add(call: str, expected: str) -> None:
        call = call.strip()
        want = _clean_expected(expected)
        if (
            want is not None
            and call not in seen
            and _is_expression(call)
            and _only_known_names(call, {entry_point})
        ):
            seen.add(call)
            examples.append(Example(call, want))

    try:
        parsed = doctest.DocTestParser().get_examples(docstring)
    except ValueError:  # malformed doctest layout: fall back to the line patterns
        parsed = []
    for ex in parsed:
        if f"{entry_point}(" in ex.source and ex.want.strip():
            add(ex.source, ex.want)
    for line in docstring.splitlines():
        line = line.strip().removeprefix(">>>").strip()
        call = _call_prefix(line, entry_point)
        if call is not None:
            match = _ARROW.match(line[len(call) :])
            if match:
                add(call, match.group(2))
            continue
        match = _FOR_OUTPUT.match(line)
        if match:
            add(f"{entry_point}({match.group(1)})", match.group(2))
    return examples


# --------------------------------------------------------------------------- model-proposed inputs


def input_request_messages(problem: CodeProblem, n: int = 5) -> list[Message]:
    """Chat messages asking the model for ``n`` test calls of the function (no expected results)."""
    return [
        {
            "role": "user",
            "content": (
                f"Here is a Python function to be written:\n\n```python\n{problem.stub.strip()}\n```\n\n"
                f"Write {n} different calls of `{problem.entry_point}` that test it well: typical "
                "inputs, edge cases (empty, zero, negative, single element) and tricky ones. Write "
                f"only the calls, one per line, like `{problem.entry_point}(...)`, in a single "
                "```python block, without results or comments."
            ),
        }
    ]


def parse_proposed_calls(text: str, entry_point: str, *, limit: int = 10) -> list[str]:
    """The valid ``entry_point(...)`` calls in a model's answer (deduplicated, at most ``limit``).

    A call must be a single expression calling ``entry_point`` whose arguments are literals
    (numbers, strings, lists, tuples, dicts, sets, possibly negative): a proposed input must not
    run code of its own.
    """
    calls: list[str] = []
    source = "\n".join(_FENCE.findall(text)) or text
    for line in source.splitlines():
        line = line.strip().rstrip(",;")
        line = re.sub(r"^(?:print\((.*)\)|assert\s+(.*?)\s*==.*)$", lambda m: m.group(1) or m.group(2), line)
        call = _call_prefix(line, entry_point)
        if call is None or call in calls:
            continue
        try:
            node = ast.parse(call, mode="eval").body
        except SyntaxError:
            continue
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        try:
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                ast.literal_eval(arg)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        calls.append(call)
        if len(calls) >= limit:
            break
    return calls


# ----------------------------------------------------------------------------------- sandbox


_HARNESS = r'''
import json as _json, signal as _signal, sys as _sys, io as _io
_calls = _json.loads(__CALLS__)
_out = open(__OUT__, "w")
_sys.stdout = _io.StringIO()  # the candidate's prints must not reach anything

def _canon(v, depth=0):
    # Outputs are compared between programs: equal values must give equal strings.
    if depth > 20:
        return "..."
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, float):
        return format(v, ".9g")
    if isinstance(v, (list, tuple)):
        inner = ",".join(_canon(x, depth + 1) for x in v)
        return ("[%s]" if isinstance(v, list) else "(%s)") % inner
    if isinstance(v, (set, frozenset)):
        return "{%s}" % ",".join(sorted(_canon(x, depth + 1) for x in v))
    if isinstance(v, dict):
        return "{%s}" % ",".join(sorted(_canon(k, depth + 1) + ":" + _canon(x, depth + 1) for k, x in v.items()))
    return repr(v)[:2000]

def _alarm(*_):
    raise TimeoutError("call timed out")

_signal.signal(_signal.SIGALRM, _alarm)
_ns = {"__name__": "candidate"}
try:
    exec(compile(__CODE__, "candidate.py", "exec"), _ns)
    if not callable(_ns.get(__ENTRY__)):
        raise NameError("the code does not define " + __ENTRY__)
except BaseException as _e:
    _out.write(_json.dumps({"load_error": type(_e).__name__ + ": " + str(_e)[:200]}) + "\n")
    _out.close()
    raise SystemExit(0)
_out.write(_json.dumps({"loaded": True}) + "\n")
_out.flush()
for _call, _expected in _calls:
    _signal.setitimer(_signal.ITIMER_REAL, __PER_CALL__)
    try:
        _value = eval(_call, _ns)
        _row = {"output": _canon(_value)}
        if _expected is not None:
            _row["passed"] = bool(_value == eval(_expected, _ns))
    except BaseException as _e:
        _row = {"output": "raised " + type(_e).__name__}
        if _expected is not None:
            _row["passed"] = False
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
    _out.write(_json.dumps(_row) + "\n")
    _out.flush()
_out.close()
'''


def _limits_preamble(memory_bytes: int, cpu_seconds: int) -> str:
    # Same limits as the evaluation's HumanEval runner (aft_graph.tasks.code, private there:
    # TODO(lead) share one); the program limits itself before any candidate code runs (no
    # preexec_fn: the caller may be threaded).
    return (
        "import resource as _r\n"
        f"_r.setrlimit(_r.RLIMIT_AS, ({memory_bytes}, {memory_bytes}))\n"
        f"_r.setrlimit(_r.RLIMIT_CPU, ({cpu_seconds}, {cpu_seconds + 1}))\n"
        "_r.setrlimit(_r.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "_r.setrlimit(_r.RLIMIT_CORE, (0, 0))\n"
        "del _r\n"
    )


@dataclass(frozen=True)
class CandidateRun:
    """What one candidate did on the inputs.

    Attributes:
        loaded: Whether its code ran and defined the function.
        error: Why it did not load (syntax error, missing function, time/memory limit).
        outputs: A canonical string per call (``"raised ValueError"`` for an exception), stated
            examples first, then the proposed inputs.
        passed: For each stated example, whether the result equalled the stated one.
    """

    loaded: bool
    error: str | None = None
    outputs: tuple[str, ...] = ()
    passed: tuple[bool, ...] = ()

    @property
    def passed_count(self) -> int:
        return sum(self.passed)


def run_candidate(
    problem: CodeProblem,
    text: str,
    calls: Sequence[str] = (),
    *,
    timeout: float = 10.0,
    per_call_timeout: float = 2.0,
    memory_mb: int = 1024,
) -> CandidateRun:
    """Run one candidate (a model response) on the stated examples and on ``calls``.

    Args:
        problem: The function to write and its stated examples.
        text: The response; its code is the last ```python block defining the function.
        calls: Extra calls (e.g. model-proposed inputs), compared between candidates only.
        timeout: Wall-clock seconds for the whole run (CPU time is capped likewise).
        per_call_timeout: Seconds one call may take before it counts as "raised TimeoutError".
        memory_mb: Address-space limit of the process.

    Returns:
        The :class:`CandidateRun`.
    """
    code = problem.program(text)
    if code is None:
        return CandidateRun(loaded=False, error="no code")
    rows = [[ex.call, ex.expected] for ex in problem.examples] + [[c, None] for c in calls]
    with tempfile.TemporaryDirectory(prefix="aft-behaviour-") as tmp:
        out_path = Path(tmp) / "results.jsonl"
        harness = (
            _HARNESS.replace("__CALLS__", repr(json.dumps(rows)))
            .replace("__OUT__", repr(str(out_path)))
            .replace("__ENTRY__", repr(problem.entry_point))
            .replace("__PER_CALL__", repr(float(per_call_timeout)))
            .replace("__CODE__", repr(code))
        )
        script = Path(tmp) / "run.py"
        script.write_text(_limits_preamble(memory_mb << 20, int(timeout) + 1) + harness)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", str(script)],
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
            start_new_session=True,  # its own process group: a timeout kills its children too
        )
        timed_out = False
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate()
        lines = out_path.read_text().splitlines() if out_path.exists() else []
    records = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
            records.append(json.loads(line))
    if not records or "load_error" in records[0]:
        if records:
            error = records[0]["load_error"]
        elif timed_out:
            error = "timed out"
        else:
            error = (stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:200]
        return CandidateRun(loaded=False, error=error)
    results = records[1:]
    # Calls the process did not reach (killed by a limit) count as timed out.
    results += [{"output": "raised TimeoutError", "passed": False}] * (len(rows) - len(results))
    n_stated = len(problem.examples)
    return CandidateRun(
        loaded=True,
        outputs=tuple(r["output"] for r in results),
        passed=tuple(bool(r.get("passed")) for r in results[:n_stated]),
    )


# ----------------------------------------------------------------------------------- voting


@dataclass(frozen=True)
class BehaviourVote:
    """Candidates grouped by behaviour, and the winner.

    Attributes:
        index: The chosen candidate (first of the winning group); ``None`` if none could run.
        groups: Candidate indices grouped by identical outputs on every input, best group first.
        runs: What each candidate did.
        examples: How many stated examples there were.
        calls: How many model-proposed inputs were run too.
    """

    index: int | None
    groups: list[list[int]]
    runs: list[CandidateRun] = field(repr=False)
    examples: int
    calls: int

    @property
    def passing(self) -> list[int]:
        """Candidates that pass every stated example (none if no examples were stated)."""
        if not self.examples:
            return []
        return [i for i, r in enumerate(self.runs) if r.loaded and r.passed_count == self.examples]


def _vote(runs: list[CandidateRun], examples: int, calls: int) -> BehaviourVote:
    by_outputs: dict[tuple[str, ...], list[int]] = {}
    for i, run in enumerate(runs):
        if run.loaded:
            by_outputs.setdefault(run.outputs, []).append(i)
    # Best: most stated examples passed, then most candidates behaving alike, then earliest.
    groups = sorted(by_outputs.values(), key=lambda g: (-runs[g[0]].passed_count, -len(g), g[0]))
    return BehaviourVote(groups[0][0] if groups else None, groups, runs, examples, calls)


def behaviour_vote(
    problem: CodeProblem, texts: Sequence[str], calls: Sequence[str] = (), **limits: float
) -> BehaviourVote:
    """Run every candidate and vote by behaviour (see the module docstring).

    Args:
        problem: The function to write (:meth:`CodeProblem.from_question`).
        texts: The candidate responses.
        calls: Extra inputs (e.g. from :func:`parse_proposed_calls`).
        **limits: ``timeout``, ``per_call_timeout``, ``memory_mb`` for :func:`run_candidate`.
    """
    runs = [run_candidate(problem, t, calls, **limits) for t in texts]  # type: ignore[arg-type]
    return _vote(runs, len(problem.examples), len(calls))


async def abehaviour_vote(
    problem: CodeProblem,
    texts: Sequence[str],
    calls: Sequence[str] = (),
    *,
    concurrency: int = 4,
    **limits: float,
) -> BehaviourVote:
    """:func:`behaviour_vote` without blocking the event loop; up to ``concurrency`` processes."""
    gate = asyncio.Semaphore(concurrency)

    async def one(text: str) -> CandidateRun:
        async with gate:
            return await asyncio.to_thread(run_candidate, problem, text, calls, **limits)  # type: ignore[arg-type]

    runs = list(await asyncio.gather(*(one(t) for t in texts)))
    return _vote(runs, len(problem.examples), len(calls))


def behaviour_notes(vote: BehaviourVote) -> list[str]:
    """One note per candidate for the aggregator: did it run, pass the stated examples, agree?"""
    group_of = {i: g for g in vote.groups for i in g}
    notes = []
    for i, run in enumerate(vote.runs):
        if not run.loaded:
            notes.append(f"Checked by running it: it does not run ({(run.error or '')[:80]}).")
            continue
        parts = []
        if vote.examples:
            parts.append(f"passes {run.passed_count} of {vote.examples} examples stated in the question")
        others = [j + 1 for j in group_of[i] if j != i]
        inputs = vote.examples + vote.calls
        if inputs:
            if others:
                listed = ", ".join(str(j) for j in others)
                parts.append(f"gives the same outputs as response(s) {listed} on all {inputs} test inputs")
            else:
                parts.append(f"its outputs on {inputs} test inputs differ from every other response")
        notes.append("Checked by running it: " + ("; ".join(parts) or "it runs") + ".")
    return notes
