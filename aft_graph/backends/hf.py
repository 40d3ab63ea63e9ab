"""HFBackend: transformers ``generate`` with micro-batching of concurrent requests.

(Over 400 lines on purpose: the micro-batching queue, padding and per-batch adapters are one
mechanism; split, each half would be unreadable alone.)

The graph sends its K proposal (or aggregation) requests at once; run one by one, transformers
would pay K full decoding loops. Here each ``generate`` call only enqueues its request and awaits a
future. A worker task waits a short window for more requests, groups the queued ones whose
sampling is compatible (everything but the seed must match: ``n`` becomes ``num_return_sequences``),
left-pads them into one batch and runs ``model.generate`` in a thread, one batch at a time, so the
event loop stays free to accept the next requests meanwhile.

LoRA adapters (peft) are applied per batch: requests are grouped by adapter too, the adapter is
activated with ``set_adapter`` and base-model requests run under ``disable_adapter()``.

Randomness: transformers samples from torch's global generator, which is seeded with the seed of
the first seeded request of each batch. A seeded run is therefore reproducible when the same
requests arrive in the same pattern (same batches); the same request batched with different
neighbours draws different samples. Use :class:`~aft_graph.backends.vllm.VLLMBackend` when
per-request seeds must hold whatever the batch.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import SHIPPED_ADAPTERS, is_shipped, resolve_adapter
from ._tokenizer import TokenizerMixin
from .base import (
    BackendError,
    BackendUnavailableError,
    Completion,
    GenerationRequest,
    check_fits,
    cut_at_stop,
)

__all__ = ["HFBackend"]

# Sampling fields that must match for requests to share one `model.generate` call (seed excluded:
# the batch has one generator) plus the clamped token budget and the adapter.
_GroupKey = tuple[int, float, float, int, int, tuple[str, ...], str | None, bool]


@dataclass
class _Pending:
    """A queued request and the future its caller awaits."""

    request: GenerationRequest
    ids: list[int]
    max_tokens: int
    future: asyncio.Future[list[Completion]] = field(repr=False)

    @property
    def key(self) -> _GroupKey:
        s = self.request.sampling
        return (
            s.n, s.temperature, s.top_p, s.top_k or 0, self.max_tokens, s.stop, self.request.lora,
            s.logprobs,
        )  # fmt: skip


class HFBackend(TokenizerMixin):
    """Generate with transformers, micro-batching the requests that arrive together.

    Args:
        model: ``"default"`` (embedded Qwen2.5-Coder-0.5B-Instruct), ``"small"`` (SmolLM2-135M) or a
            local model directory.
        dtype: Weight dtype (``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"``); float32 is
            the fast choice on a CPU without AVX-512 BF16.
        max_batch_size: Most sequences (requests x ``n``) in one ``model.generate`` call; a single
            request with a larger ``n`` still runs alone in one call.
        batch_window_s: How long the worker waits after the first queued request for others to
            join its batch.
        max_model_len: Context window (prompt + completion); defaults to the model's
            ``max_position_embeddings``.
        adapters: LoRA adapters to load up front, ``{name: adapter_dir}``; requests select one with
            ``GenerationRequest(lora=name)``. An adapter directory given as ``lora`` is loaded on
            first use.

    Raises:
        ModelNotFoundError: the model path does not exist or is not a model directory.
        FileNotFoundError: an adapter directory has no ``adapter_config.json``.
    """

    supports_logprobs = True

    def __init__(
        self,
        model: str | os.PathLike[str] = "default",
        *,
        dtype: str = "float32",
        max_batch_size: int = 16,
        batch_window_s: float = 0.01,
        max_model_len: int | None = None,
        adapters: dict[str, str | os.PathLike[str]] | None = None,
    ) -> None:
        from ..models import resolve_model

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model_path: Path = resolve_model(model)  # fails fast, before the heavy imports

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.model: Any = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch_dtype)
        self.model.eval()
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s

        config = self.model.config.get_text_config()
        self._context_window = max_model_len or int(config.max_position_embeddings)
        # The model's generation config may end turns with several tokens (Qwen: <|im_end|> and
        # <|endoftext|>); any of them ends a completion.
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        if not eos_ids:
            raise BackendError(f"{self.model_path} defines no end-of-sequence token")
        self._eos_ids = sorted(eos_ids)
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else self._eos_ids[0]

        # One model.generate at a time: the adapter selection and torch's global generator are
        # model/process-wide state.
        self._model_lock = threading.Lock()
        self._adapters: dict[str, str] = {}  # user name or directory -> peft adapter name
        for name, path in (adapters or {}).items():
            self._load_adapter(name, path)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task[None] | None = None
        self._queue: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None

    @property
    def context_window(self) -> int:
        return self._context_window

    # ---------------------------------------------------------------- adapters

    def register_adapter(self, name: str, path: str | os.PathLike[str]) -> str:
        """Load a peft LoRA adapter directory; requests then select it with ``lora=name``."""
        with self._model_lock:
            self._load_adapter(name, path)
        return name

    def _load_adapter(self, name: str, path: str | os.PathLike[str]) -> None:
        from peft import PeftModel

        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a LoRA adapter directory (no adapter_config.json): pass the "
                "directory that `aft-train sft` or peft's save_pretrained() wrote"
            )
        if name in self._adapters:
            return
        # peft keeps adapters in a ModuleDict, whose keys cannot hold "." or "/": use our own ids.
        internal = f"aft_adapter_{len(self._adapters)}"
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(path), adapter_name=internal)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=internal)
            self.model.eval()
        self._adapters[name] = internal

    @contextmanager
    def _adapter(self, lora: str | None) -> Iterator[None]:
        """Run the body with ``lora`` active, or with every adapter off for base requests."""
        if lora is None:
            if not self._adapters:
                yield
                return
            with self.model.disable_adapter():
                yield
            return
        if lora not in self._adapters:
            # A shipped adapter by name ("aft") or a directory given directly, on first use.
            self._load_adapter(lora, resolve_adapter(lora, model_path=self.model_path))
        self.model.set_adapter(self._adapters[lora])
        yield

    # ---------------------------------------------------------------- generation

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        if self.model is None:
            raise BackendUnavailableError("this HFBackend was closed: create a new one")
        if (
            request.lora is not None
            and request.lora not in self._adapters
            and not (Path(request.lora) / "adapter_config.json").is_file()
            and not is_shipped(request.lora)
        ):
            raise BackendError(
                f"unknown LoRA adapter {request.lora!r}: pass adapters={{name: dir}} to HFBackend, "
                "call register_adapter(name, dir), give the adapter directory itself, or name a "
                f"shipped adapter ({', '.join(SHIPPED_ADAPTERS)})"
            )
        ids = self.encode_prompt(request)
        max_tokens = check_fits(len(ids), request.sampling, self.context_window)
        self._ensure_worker()
        assert self._wakeup is not None
        future: asyncio.Future[list[Completion]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(request, ids, max_tokens, future))
        self._wakeup.set()
        return await future

    def _ensure_worker(self) -> None:
        """Start the batching worker on the running loop (again, if an earlier loop ended)."""
        loop = asyncio.get_running_loop()
        if self._worker is not None and not self._worker.done() and self._loop is loop:
            return
        self._loop = loop
        self._queue = []
        self._wakeup = asyncio.Event()
        self._worker = loop.create_task(self._work(), name="HFBackend-batcher")

    async def _work(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            if self.batch_window_s > 0:
                await asyncio.sleep(self.batch_window_s)
            # Take the queue and clear the flag in one step (no await between): a request that
            # arrives later sets the flag again and is picked up by the next round.
            self._wakeup.clear()
            pending, self._queue = self._queue, []
            for batch in self._plan([p for p in pending if not p.future.done()]):
                await self._run(batch)

    def _plan(self, pending: list[_Pending]) -> list[list[_Pending]]:
        """Group compatible requests (arrival order kept), then cut groups to max_batch_size."""
        groups: dict[_GroupKey, list[_Pending]] = {}
        for p in pending:
            groups.setdefault(p.key, []).append(p)
        batches: list[list[_Pending]] = []
        for group in groups.values():
            batch: list[_Pending] = []
            size = 0
            for p in group:
                n = p.request.sampling.n
                if batch and size + n > self.max_batch_size:
                    batches.append(batch)
                    batch, size = [], 0
                batch.append(p)
                size += n
            batches.append(batch)
        return batches

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            stopping = self._stopping_criteria(batch[0].request.sampling.stop)
            rows, logprobs = await asyncio.to_thread(self._generate_batch, batch, stopping)
            results = self._completions(batch, rows, logprobs)
        except asyncio.CancelledError:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(BackendUnavailableError("the HFBackend was closed"))
            raise
        except Exception as exc:  # noqa: BLE001 - delivered to every caller of the batch
            error = exc if isinstance(exc, BackendError) else BackendError(f"generation failed: {exc!r}")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        for p, completions in zip(batch, results, strict=True):
            if not p.future.done():  # the caller may have been cancelled meanwhile
                p.future.set_result(completions)

    def _stopping_criteria(self, stop: tuple[str, ...]):
        # Built here, on the event-loop thread: the fast tokenizer must not be used from two
        # threads at once (the loop thread keeps encoding new requests during a batch).
        if not stop:
            return None
        from transformers import StoppingCriteriaList, StopStringCriteria

        return StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(stop))])

    def _generate_batch(
        self, batch: list[_Pending], stopping: Any
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Run one left-padded ``model.generate``; return the new tokens of every sequence.

        Rows come back grouped per request: request i's j-th sample is row ``i * n + j``. With
        ``Sampling.logprobs`` each row's token log-probabilities come back too, computed from the
        raw logits (before temperature / top-p, as vLLM's default ``raw_logprobs``).
        """
        import torch
        from transformers import GenerationConfig

        sampling = batch[0].request.sampling
        n = sampling.n
        greedy = sampling.temperature == 0.0
        width = max(len(p.ids) for p in batch)
        input_ids = torch.tensor([[self._pad_id] * (width - len(p.ids)) + p.ids for p in batch])
        attention_mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in batch])
        # Every field is set explicitly: unset ones would be filled from transformers' defaults
        # (top_k=50) or the checkpoint's generation_config.json (repetition penalty...), and the
        # samples would no longer follow the request's sampling (nor match vLLM's).
        config = dict(
            max_new_tokens=batch[0].max_tokens,
            eos_token_id=self._eos_ids,
            pad_token_id=self._pad_id,
            repetition_penalty=1.0,
            num_beams=1,
        )
        want_logprobs = sampling.logprobs
        if want_logprobs:
            config.update(return_dict_in_generate=True, output_logits=True)
        if greedy:
            # Greedy samples are identical: decode once per request and copy (transformers also
            # refuses num_return_sequences > 1 without sampling).
            config.update(do_sample=False, num_return_sequences=1)
        else:
            config.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k or 0,
                num_return_sequences=n,
            )
        with self._model_lock:
            if self.model is None:
                raise BackendUnavailableError("the HFBackend was closed")
            seed = next((p.request.sampling.seed for p in batch if p.request.sampling.seed is not None), None)
            if seed is not None:
                torch.manual_seed(seed)
            with self._adapter(batch[0].request.lora), torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=GenerationConfig(**config),
                    stopping_criteria=stopping,
                )
        logprobs = None
        if want_logprobs:
            new = out.sequences[:, width:]
            # One step at a time: a (rows, steps, vocab) tensor would be large for long outputs.
            steps = [
                torch.log_softmax(logits.float(), dim=-1).gather(1, new[:, t : t + 1]).squeeze(1)
                for t, logits in enumerate(out.logits)
            ]
            logprobs = torch.stack(steps, dim=1).tolist()
            out = out.sequences
        rows = out[:, width:].tolist()
        if greedy and n > 1:
            rows = [row for row in rows for _ in range(n)]
            logprobs = None if logprobs is None else [lp for lp in logprobs for _ in range(n)]
        return rows, logprobs

    def _completions(
        self, batch: list[_Pending], rows: list[list[int]], logprobs: list[list[float]] | None = None
    ) -> list[list[Completion]]:
        n = batch[0].request.sampling.n
        return [
            [
                self._completion(p, rows[i * n + j], None if logprobs is None else logprobs[i * n + j])
                for j in range(n)
            ]
            for i, p in enumerate(batch)
        ]

    def _completion(
        self, pending: _Pending, row: list[int], logprobs: list[float] | None = None
    ) -> Completion:
        """Text, exact token count and finish reason of one generated row.

        After a sequence ends, transformers fills its row with padding, which may be the eos id
        itself (SmolLM2): so the count stops at the first eos (included, as vLLM counts it), and a
        stop string is located by decoding prefixes, not by trusting the padding.
        """
        eos = next((i for i, t in enumerate(row) if t in self._eos_ids), None)
        tokens = row if eos is None else row[: eos + 1]
        decode: Callable[[list[int]], str] = lambda ids: self.tokenizer.decode(  # noqa: E731
            ids, skip_special_tokens=True
        )
        stop = pending.request.sampling.stop
        text, stopped = cut_at_stop(decode(tokens), stop)
        if stopped:
            used = _first_prefix(len(tokens), lambda k: cut_at_stop(decode(tokens[:k]), stop)[1])
            finish = "stop"
        elif eos is not None:
            used, finish = eos + 1, "stop"
        else:
            used, finish = len(tokens), "length" if len(tokens) >= pending.max_tokens else "stop"
        return Completion(
            text=text,
            prompt_tokens=len(pending.ids),
            completion_tokens=used,
            finish_reason=finish,
            token_logprobs=None if logprobs is None else tuple(logprobs[:used]),
        )

    # ---------------------------------------------------------------- lifecycle

    async def aclose(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None and not worker.done():
            worker.cancel()
            if worker.get_loop() is asyncio.get_running_loop():
                with suppress(asyncio.CancelledError):
                    await worker
        # A batch may still be running in its thread: wait for it off the event loop.
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Fail queued requests and release the model (safe to call twice)."""
        for p in self._queue:
            if not p.future.done() and not p.future.get_loop().is_closed():
                p.future.set_exception(BackendUnavailableError("the HFBackend was closed"))
        self._queue = []
        with self._model_lock:
            self.model = None

    async def __aenter__(self) -> HFBackend:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def _first_prefix(length: int, holds: Callable[[int], bool]) -> int:
    """Smallest k in [1, length] with ``holds(k)`` (monotone; ``holds(length)`` is true)."""
    lo, hi = 1, length
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
