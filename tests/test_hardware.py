"""The CPU profile picks engine and trainer defaults from the CPU's own feature flags."""

from __future__ import annotations

import pytest

from aft_graph.hardware import CPUProfile, cpu_profile

AVX2_EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n"
AMX_XEON = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\n"
    "flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
)


def _profile(tmp_path, text: str) -> CPUProfile:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    cpu_profile.cache_clear()
    try:
        return cpu_profile(path)
    finally:
        cpu_profile.cache_clear()


def test_avx2_only_cpu_gets_float32(tmp_path):
    profile = _profile(tmp_path, AVX2_EPYC)
    assert "avx2" in profile.flags
    assert not profile.native_bf16
    assert profile.vllm_dtype == "float32"


def test_amx_cpu_gets_bfloat16(tmp_path):
    profile = _profile(tmp_path, AMX_XEON)
    assert profile.native_bf16
    assert profile.vllm_dtype == "bfloat16"


def test_avx512_bf16_without_amx_gets_bfloat16():
    profile = CPUProfile(flags=frozenset({"avx2", "avx512f", "avx512_bf16"}), cpus=(0, 1))
    assert profile.vllm_dtype == "bfloat16"


def test_unreadable_cpuinfo_falls_back_to_float32(tmp_path):
    cpu_profile.cache_clear()
    try:
        profile = cpu_profile(tmp_path / "does-not-exist")
    finally:
        cpu_profile.cache_clear()
    assert profile.flags == frozenset()
    assert profile.vllm_dtype == "float32"


def test_small_machine_binds_every_cpu_and_reserves_none():
    env = CPUProfile(flags=frozenset(), cpus=(0, 1)).vllm_env()
    assert env == {"VLLM_CPU_OMP_THREADS_BIND": "0,1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    # An affinity mask that is not 0..n-1 (a container pinned to CPUs 2 and 5) is bound as it is.
    env = CPUProfile(flags=frozenset(), cpus=(2, 5)).vllm_env()
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "2,5"


def test_large_machine_keeps_vllms_own_binding():
    assert CPUProfile(flags=frozenset(), cpus=tuple(range(16))).vllm_env() == {}


def test_engine_args_follow_the_profile(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    from aft_graph.backends import vllm as vllm_backend

    if not current_platform.is_cpu():
        pytest.skip("CPU defaults only")
    amx = CPUProfile(flags=frozenset({"amx_bf16"}), cpus=(0, 1))
    avx2 = CPUProfile(flags=frozenset({"avx2"}), cpus=(0, 1))
    monkeypatch.setattr(vllm_backend, "cpu_profile", lambda: amx)
    assert vllm_backend.engine_args("m", max_model_len=512)["dtype"] == "bfloat16"
    monkeypatch.setattr(vllm_backend, "cpu_profile", lambda: avx2)
    assert vllm_backend.engine_args("m", max_model_len=512)["dtype"] == "float32"
    # An explicit dtype always wins.
    assert vllm_backend.engine_args("m", max_model_len=512, dtype="bfloat16")["dtype"] == "bfloat16"
    env = vllm_backend.engine_env(kv_cache_gib=2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert int(env["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"]) > 300


def test_server_command_computes_like_the_in_process_engine(monkeypatch, tmp_path):
    """`aft-graph engine`'s server gets VLLMBackend's dtype, scheduler settings and binding."""
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    from aft_graph.backends import vllm as vllm_backend

    if not current_platform.is_cpu():
        pytest.skip("CPU defaults only")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(vllm_backend, "cpu_profile", lambda: CPUProfile(flags=frozenset({"amx_bf16"}), cpus=(0, 1)))
    argv, env = vllm_backend.server_command(model, port=8123, max_model_len=1024, loras={"mine": adapter})
    flags = " ".join(argv)
    assert "--dtype bfloat16" in flags and "--port 8123" in flags and f"--model {model}" in flags
    assert "--no-enable-chunked-prefill" in flags and "--max-num-batched-tokens 8192" in flags
    assert flags.endswith(f"--lora-modules mine={adapter}")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    monkeypatch.setattr(vllm_backend, "cpu_profile", lambda: CPUProfile(flags=frozenset({"avx2"}), cpus=(0, 1)))
    argv, _ = vllm_backend.server_command(model)
    assert "--dtype float32" in " ".join(argv) and "--enable-lora" not in argv
    with pytest.raises(ValueError, match="neither a shipped adapter"):
        vllm_backend.server_command(model, loras={"x": tmp_path / "missing"})


def test_user_environment_wins(monkeypatch):
    import os

    from aft_graph.backends.vllm import apply_engine_env

    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    apply_engine_env({"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_OMP_THREADS_BIND": "0,1"})
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"


def test_sft_autocast_follows_the_cpu(monkeypatch):
    from aft_graph import hardware
    from trainer.sft import use_bf16_autocast

    amx = CPUProfile(flags=frozenset({"amx_bf16"}), cpus=(0, 1))
    avx2 = CPUProfile(flags=frozenset({"avx2"}), cpus=(0, 1))
    monkeypatch.setattr(hardware, "cpu_profile", lambda: amx)
    assert use_bf16_autocast("auto", on_gpu=False)
    assert not use_bf16_autocast("no", on_gpu=False)
    assert not use_bf16_autocast("auto", on_gpu=False, dtype="float16")
    monkeypatch.setattr(hardware, "cpu_profile", lambda: avx2)
    assert not use_bf16_autocast("auto", on_gpu=False)
    assert use_bf16_autocast("bf16", on_gpu=False)
