"""`langgraph dev` serves the aggregation graph from langgraph.json; a langgraph_sdk client runs it.

Generation goes to the session's real `vllm serve` process on the small model (AFT_GRAPH_BASE_URL),
the deployment the README recommends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_langgraph_json_points_at_the_factory():
    spec = json.loads((ROOT / "langgraph.json").read_text())
    path, _, attr = spec["graphs"]["aft"].partition(":")
    assert (ROOT / path).is_file() and attr == "make_graph"


@pytest.fixture
def langgraph_dev(vllm_server, tmp_path):
    pytest.importorskip("langgraph_api")
    langgraph = shutil.which("langgraph", path=str(Path(sys.executable).parent)) or shutil.which("langgraph")
    if langgraph is None:
        pytest.skip("langgraph-cli is not installed (pip install -e '.[deploy]')")
    port = _free_port()
    env = {
        **os.environ,
        "AFT_GRAPH_BASE_URL": vllm_server,
        "PYTHONPATH": str(ROOT),  # this checkout's aft_graph, whatever the venv has installed
        "LANGGRAPH_CLI_NO_ANALYTICS": "1",
    }
    log_path = tmp_path / "langgraph-dev.log"
    cmd = [langgraph, "dev", "--no-browser", "--no-reload", "--port", str(port), "--config", "langgraph.json"]
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"langgraph dev exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    if httpx.get(f"{url}/ok", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"langgraph dev not up after 180 s; log: {log_path}"
                time.sleep(0.5)
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


async def test_sdk_client_receives_layer_events_and_the_answer(langgraph_dev):
    from langgraph_sdk import get_client

    client = get_client(url=langgraph_dev)
    assistant = await client.assistants.create(
        "aft", config={"configurable": {"strategy": "aft-k2-l1", "max_tokens": 32, "seed": 0}}, name="aft-k2-l1"
    )
    thread = await client.threads.create()
    custom, final = [], None
    async for part in client.runs.stream(
        thread["thread_id"], assistant["assistant_id"],
        input={"question": "What is 9 + 4? Put the final answer in \\boxed{}."},
        stream_mode=["custom", "values"],
    ):  # fmt: skip
        if part.event == "custom":
            custom.append(part.data)
        elif part.event == "values":
            final = part.data
        assert part.event != "error", part.data
    assert [(ev["layer"], ev["kind"], len(ev["texts"])) for ev in custom] == [
        (0, "proposals", 2),
        (1, "aggregation", 2),
    ]
    assert final["answer"].strip() and final["answer"] in custom[-1]["texts"]
    assert final["usage"]["calls"] == 4
    assert final["messages"][-1]["content"] == final["answer"]
    # the thread keeps the run's state on the server
    state = await client.threads.get_state(thread["thread_id"])
    assert state["values"]["answer"] == final["answer"]
