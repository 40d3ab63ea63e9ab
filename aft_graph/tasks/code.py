"""HumanEval: the code of a response, run against the problem's tests in a limited process.

Model-written code runs on this machine. The limits (CPU time, wall time, memory, file size) stop
runaway loops and memory hogs, not a hostile program: evaluate code suites inside a container or
VM if the model is not trusted.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .task import Task

__all__ = ["defines", "extract_code", "program_key", "run_humaneval"]

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def defines(code: str, entry_point: str) -> bool:
    """Whether ``code`` has a ``def entry_point(`` line."""
    return re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.M) is not None


def program_key(text: str, entry_point: str | None = None) -> str | None:
    """What two code responses must share to count as the same vote: the extracted code with blank
    lines and comments removed (exact grouping: equivalent programs are only recognized by running
    them, see :mod:`aft_graph.code_behaviour`); ``None`` for a response without code."""
    code = extract_code(text, entry_point)
    lines = [ln.rstrip() for ln in code.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return "\n".join(lines) or None


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code of a response: the last fenced block that defines ``entry_point``.

    Falls back to the longest fenced block, then to the whole text (a bare completion).
    """
    blocks = [b for b in _FENCE.findall(text) if b.strip()]
    if not blocks:
        return text
    if entry_point:
        defining = [b for b in blocks if defines(b, entry_point)]
        if defining:
            return defining[-1]
    return max(blocks, key=len)


def _program(task: Task, text: str) -> str:
    meta = task.metadata
    code = extract_code(text, meta["entry_point"])
    if defines(code, meta["entry_point"]):
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
