"""A trainer stage SIGKILLed mid-way resumes without redoing finished rows.

``aft-train proposals`` runs as a real subprocess against a slow OpenAI-compatible fake server (in
this process), is killed with SIGKILL after some rows are written, and is run again: the second
run sends no request for a row the first one finished, and every row ends up written once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROWS = 24


class _SlowServer:
    """/v1/models and /v1/chat/completions; every completion takes ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.questions: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                card = {"id": "served", "object": "model", "created": 0, "owned_by": "vllm",
                        "max_model_len": 4096}  # fmt: skip
                self._send({"object": "list", "data": [card]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.questions.append(body["messages"][-1]["content"])
                time.sleep(delay)
                choices = [
                    {"index": i, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": f"<answer>{i}</answer>"}}
                    for i in range(body.get("n", 1))
                ]  # fmt: skip
                self._send({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": choices,
                    "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
                })  # fmt: skip

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _ids(path: Path) -> list[str]:
    ids = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError):  # a half-written last line
            ids.append(json.loads(line)["id"])
    return ids


def test_a_sigkilled_proposals_stage_resumes_without_redoing_finished_rows(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps(
                {"id": f"t{i}", "question": f"Row {i}: what is {i} + 1?", "answer": str(i + 1)}
            )
            + "\n"
            for i in range(ROWS)
        )  # fmt: skip
    )
    (tmp_path / "cfg.json").write_text(json.dumps({"concurrency": 2, "samples": 2}))
    out = tmp_path / "proposals.jsonl"
    server = _SlowServer(delay=0.25)
    cmd = [
        sys.executable, "-m", "trainer", "proposals", "--tasks", str(tasks), "--out", str(out),
        "--engine", "openai", "--base-url", server.url, "--model", "served",
        "--config", str(tmp_path / "cfg.json"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (out.exists() and len(_ids(out)) >= 4):
            assert first.poll() is None, first.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the stage wrote nothing in 120 s"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        finished = set(_ids(out))
        assert 4 <= len(finished) < ROWS  # killed mid-way
        asked_before = len(server.questions)

        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    finally:
        server.close()
    redone = [q for q in server.questions[asked_before:]
              if any(f"Row {t[1:]}:" in q for t in finished)]  # fmt: skip
    assert redone == []  # no finished row was asked again
    ids = _ids(out)
    assert sorted(ids) == sorted(f"t{i}" for i in range(ROWS))  # every row exactly once
    assert len(server.questions) - asked_before <= ROWS - len(finished)
