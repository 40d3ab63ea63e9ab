"""The CPU defaults change speed, not results: seeded texts are the same with vLLM's own binding.

The session engine runs with the binding chosen by :mod:`aft_graph.hardware` (every core computes
on a small machine); a child process starts the same model with what shipped before (vLLM's own
binding, one core kept for its scheduler) and the same dtype. Seeded requests, including a batch
of concurrent ones with prefix caching on, must give identical texts on both.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from conftest import MAX_MODEL_LEN

from aft_graph.backends import GenerationRequest, Sampling

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

_QUESTIONS = ["What is 7 * 8?", "Name a prime number above 20.", "Spell 'cat' backwards."]


def _requests() -> list[GenerationRequest]:
    # Same question four times with different seeds: concurrent requests sharing a prefix, the
    # aggregation layer's shape.
    return [
        GenerationRequest(
            messages=({"role": "user", "content": q},),
            sampling=Sampling(n=1, temperature=0.8, max_tokens=24, seed=1000 * i + j),
        )
        for i, q in enumerate(_QUESTIONS)
        for j in range(4)
    ]


_CHILD = """
import asyncio, json, sys
from aft_graph.backends import GenerationRequest, VLLMBackend

async def main():
    requests = [GenerationRequest.model_validate(r) for r in json.loads(sys.stdin.read())]
    backend = VLLMBackend(sys.argv[1], max_model_len=int(sys.argv[2]), dtype=sys.argv[3], kv_cache_gib=1)
    try:
        outs = await asyncio.gather(*(backend.generate(r) for r in requests))
        print(json.dumps([c.text for out in outs for c in out]))
    finally:
        await backend.aclose()

if __name__ == "__main__":
    asyncio.run(main())
"""


async def test_seeded_texts_do_not_depend_on_the_cpu_binding(
    vllm_backend, small_model_dir, tmp_path
):
    dtype = vllm_backend.engine.model_config.dtype
    dtype_name = str(dtype).removeprefix("torch.")
    outs = await asyncio.gather(*(vllm_backend.generate(r) for r in _requests()))
    ours = [c.text for out in outs for c in out]

    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": "auto",  # what shipped before: vLLM's own binding
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
        "VLLM_LOGGING_LEVEL": "ERROR",
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(small_model_dir), str(MAX_MODEL_LEN), dtype_name],
        input=json.dumps([r.model_dump(mode="json") for r in _requests()]),
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(ours) == len(_requests()) and all(ours)
    assert ours == theirs
