"""Where the demo's start-up goes, and what a warm engine saves (issue 10, item 5).

    .venv/bin/python benchmarks/startup.py                      # default model, ~5 min on 2 CPUs
    .venv/bin/python benchmarks/startup.py --out docs/engines.md  # and append the table there

Side by side in one run, the same question and settings (AFT K=4 L=1, ``--max-tokens``):

1. ``aft-graph run Q``: the in-process engine, started for this one question (what ``make demo``
   does). vLLM's own log splits its start-up: weight loading, engine initialisation (memory
   profile, KV cache, warm-up), and the rest (three processes spawned, each importing torch and
   vLLM; model config; tokenizer).
2. ``aft-graph engine``: the warm server's start-up, until ``/health`` answers (paid once).
3. ``aft-graph run Q --base-url``: the same question on the warm server (what every later run
   costs).
4. ``python -c "import vllm"``: one process's import of torch and vLLM, for scale.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
QUESTION = (
    "A shop sells pens at 3 dollars each and notebooks at 5 dollars each. Mia buys 4 pens and 3 "
    "notebooks and pays with a 50 dollar bill. How much change does she get? Put the final "
    "answer in \\boxed{}."
)


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stdout + proc.stderr


def _log_seconds(log: str, pattern: str) -> float | None:
    match = re.search(pattern, log)
    return float(match.group(1)) if match else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, help="append the table to this markdown file")
    args = parser.parse_args()
    run = [str(BIN / "aft-graph"), "run", QUESTION, "--model", args.model, "--proposals", "4",
           "--layers", "1", "--max-tokens", str(args.max_tokens), "--verbose"]  # fmt: skip
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "INFO"}
    load_before = os.getloadavg()[0]

    import_s, _ = _timed([sys.executable, "-c", "import vllm"])
    cold_s, log = _timed(run, env)
    weights = _log_seconds(log, r"Loading weights took ([\d.]+) seconds")
    init = _log_seconds(log, r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+)")

    port = _free_port()
    t = time.perf_counter()
    server = subprocess.Popen(
        [str(BIN / "aft-graph"), "engine", "--model", args.model, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=ROOT,
    )  # fmt: skip
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"aft-graph engine exited with {server.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        server_s = time.perf_counter() - t
        warm_s, _ = _timed([*run, "--base-url", f"http://127.0.0.1:{port}/v1"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    rest = cold_s - (weights or 0) - (init or 0)
    rows = [
        "| step | seconds |",
        "|---|---:|",
        f"| `aft-graph run` in-process (cold engine), whole command | {cold_s:.1f} |",
        f"| &nbsp;&nbsp;of which: loading weights (vLLM log) | {weights or float('nan'):.1f} |",
        f"| &nbsp;&nbsp;of which: engine init: memory profile, KV cache, warm-up (vLLM log) | {init or float('nan'):.1f} |",
        f"| &nbsp;&nbsp;of which: the rest: 3 processes spawned and importing, config, tokenizer, the question itself | {rest:.1f} |",
        f"| `python -c 'import vllm'` (one process, for scale) | {import_s:.1f} |",
        f"| `aft-graph engine` until `/health` (once) | {server_s:.1f} |",
        f"| `aft-graph run --base-url` on the warm engine, whole command | {warm_s:.1f} |",
        f"| **cold / warm** | **{cold_s / warm_s:.1f}x** |",
    ]
    stamp = (
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, model {args.model}, AFT K=4 L=1, "
        f"max_tokens {args.max_tokens}; load average (1 min) {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after. Command: `python benchmarks/startup.py"
        f"{' --model ' + args.model if args.model != 'default' else ''}`."
    )
    text = "\n".join(rows) + "\n\n" + stamp + "\n"
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n## Start-up: cold in-process engine vs a warm `aft-graph engine`\n\n" + text)


if __name__ == "__main__":
    main()
