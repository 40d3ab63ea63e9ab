"""LoRA SFT of the aggregator: (query + proposals -> aggregation), loss on the aggregation only.

(Over 400 lines on purpose: example rendering, label masking, the collator and the Trainer set-up
are the steps of one training function and are tested together.)

Each example is rendered with the tokenizer's chat template from exactly the messages the graph
sends at inference (:func:`example_messages` calls :func:`aft_graph.prompts.aggregation_messages`
with the record's template). Labels are ``-100`` on every prompt token (system, query, proposals,
the assistant header) and equal ``input_ids`` on the target's tokens (the aggregation and the
end-of-turn token): the prompt and the full conversation are tokenized separately and the prompt's
length is masked, like trl's completion-only loss.

Training is the transformers ``Trainer`` with a peft LoRA model (its loss computes vocabulary
logits only at target positions: :mod:`trainer.target_loss`), so ``accelerate launch`` scales it
across devices and machines; checkpoints go to ``<output_dir>/checkpoints`` and a rerun resumes
from the last one. The final adapter is written to ``<output_dir>/adapter``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aft_graph.prompts import aggregation_messages, proposal_messages

from ._models import load_causal_lm
from .aggregations import copies_proposal, get_template
from .config import SFTConfig
from .records import AggregationRecord, DataReport, Proposal, TaskRecord, read_records
from .target_loss import target_logits_trainer

__all__ = [
    "IGNORE_INDEX",
    "CompletionCollator",
    "SFTResult",
    "TemplateMismatchError",
    "build_examples",
    "example_messages",
    "tokenize_example",
    "train_sft",
    "use_bf16_autocast",
]

IGNORE_INDEX = -100
Message = dict[str, str]


class TemplateMismatchError(ValueError):
    """The chat template renders the prompt differently inside the full conversation."""


def example_messages(
    record: AggregationRecord,
    *,
    input_mode: str = "aggregation",
    template: str | None = None,
) -> list[Message]:
    """The prompt messages of a training example: the aggregator's inference prompt.

    ``input_mode="plain"`` (or a record without proposals) gives the plain proposal prompt
    (query only), the no-proposals ablation.
    """
    if input_mode == "plain" or not record.proposals:
        return proposal_messages(record.question)
    return aggregation_messages(
        record.question, record.proposals, get_template(template or record.template)
    )


def tokenize_example(
    tokenizer: Any, prompt: Sequence[Message], target: str
) -> dict[str, list[int]]:
    """``input_ids`` / ``labels`` / ``attention_mask`` of prompt + target, loss on the target only.

    The prompt ids are exactly what an inference engine feeds the model for ``prompt`` (chat
    template with the generation prompt, no extra special tokens).

    Raises:
        TemplateMismatchError: the template renders the prompt differently inside the full
            conversation (e.g. templates that rewrite earlier turns), so no clean mask exists.
    """
    prompt = [dict(m) for m in prompt]
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": target}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise TemplateMismatchError(
            "the chat template does not render the prompt as a prefix of the full conversation"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        # The tokenizer merged across the prompt/target boundary: keep the inference prompt ids and
        # tokenize the completion on its own (what the model generates after that prompt).
        completion = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        full_ids = list(prompt_ids) + list(completion)
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(full_ids[len(prompt_ids) :])
    return {
        "input_ids": list(full_ids),
        "labels": labels,
        "attention_mask": [1] * len(full_ids),
    }


class _PlainRow(TaskRecord):
    """A plain-data row: a question with a target, or with scored proposals (best one used)."""

    target: str | None = None
    proposals: list[Proposal] = []


def _plain_records(
    config: SFTConfig, records: list[AggregationRecord], report: DataReport
) -> list[AggregationRecord]:
    """The pool of plain (query -> response) examples for the mix."""
    pool: list[AggregationRecord] = []
    if config.plain_data is None:
        seen: set[str] = set()
        for r in records:
            key = r.query_id or r.id
            if key not in seen:
                seen.add(key)
                pool.append(r.model_copy(update={"proposals": [], "proposal_rewards": []}))
        return pool
    sub = DataReport(stage="plain data")
    for row in read_records(config.plain_data, _PlainRow, sub):
        target = row.target
        if not (target and target.strip()) and row.proposals:
            best = max(
                row.proposals, key=lambda p: p.reward if p.reward is not None else float("-inf")
            )
            target = best.text
        if not (target and target.strip()):
            sub.skip("no target or proposal", row.id)
            continue
        pool.append(AggregationRecord(**row.task_fields(), target=target, target_source="dataset"))
    for reason, n in sub.skipped.items():
        report.skipped[f"plain data: {reason}"] += n
    return pool


def build_examples(
    tokenizer: Any,
    config: SFTConfig,
    records: Iterable[AggregationRecord] | None = None,
    report: DataReport | None = None,
) -> list[dict[str, Any]]:
    """Tokenized training examples from the config's data files (or ``records``).

    Rows that fail validation, are longer than ``max_seq_len``, or whose chat template cannot be
    masked cleanly are counted in ``report`` and skipped.
    """
    report = report if report is not None else DataReport(stage="sft examples")
    if records is None:
        records = [r for path in config.data for r in read_records(path, AggregationRecord, report)]
    else:
        records = list(records)
        report.read += len(records)
    if config.drop_copies:
        kept = [r for r in records if not copies_proposal(r.target, r.proposals)]
        report.note("targets that copy a proposal left out (drop_copies)", len(records) - len(kept))
        records = kept
    rng = random.Random(config.seed)
    items: list[tuple[AggregationRecord, str]] = [(r, config.input_mode) for r in records]
    if config.plain_fraction > 0 and config.input_mode == "aggregation":
        pool = _plain_records(config, records, report)
        n = min(len(pool), round(config.plain_fraction * len(records)))
        items += [(r, "plain") for r in rng.sample(pool, n)]
        report.note("plain examples mixed in", n)
    examples = []
    for record, mode in items:
        if config.shuffle_proposals and record.proposals:
            order = list(range(len(record.proposals)))
            rng.shuffle(order)
            record = record.model_copy(update={"proposals": [record.proposals[i] for i in order]})
        try:
            messages = example_messages(record, input_mode=mode, template=config.template)
            example = tokenize_example(tokenizer, messages, record.target)
        except TemplateMismatchError as exc:
            report.skip("chat template mismatch", f"{record.id}: {exc}")
            continue
        except ValueError as exc:
            report.skip("bad template", f"{record.id}: {exc}")
            continue
        if len(example["input_ids"]) > config.max_seq_len:
            report.skip(
                "over-long",
                f"{record.id}: {len(example['input_ids'])} tokens > {config.max_seq_len}",
            )
            continue
        example["kind"] = mode
        examples.append(example)
        report.kept += 1
    return examples


class CompletionCollator:
    """Pads a batch: ``input_ids`` with the pad id, ``labels`` with -100, ``attention_mask`` with 0."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor(
                [list(f[key]) + [value] * (length - len(f[key])) for f in features],
                dtype=torch.long,
            )

        return {
            "input_ids": pad("input_ids", self.pad_token_id),
            "labels": pad("labels", IGNORE_INDEX),
            "attention_mask": pad("attention_mask", 0),
        }


class _ListDataset:
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = [{k: v for k, v in it.items() if k != "kind"} for it in items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


@dataclass
class SFTResult:
    """What a training run produced."""

    output_dir: Path
    adapter_dir: Path
    examples: int
    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    runtime_s: float = 0.0
    resumed_from: str | None = None
    report: DataReport | None = None

    @property
    def first_loss(self) -> float | None:
        return self.losses[0][1] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None


def use_bf16_autocast(mode: str, *, on_gpu: bool, dtype: str = "float32") -> bool:
    """Whether the Trainer should run in bfloat16 autocast (``SFTConfig.mixed_precision``).

    ``auto`` turns it on only where bfloat16 is computed natively: a GPU that supports it, or a
    CPU with AVX-512 BF16 / AMX (:func:`aft_graph.hardware.cpu_profile`). float16 weights keep
    fp16 instead.
    """
    if mode == "no" or dtype == "float16":
        return False
    if mode == "bf16":
        return True
    if on_gpu:
        import torch

        return torch.cuda.is_bf16_supported()
    from aft_graph.hardware import cpu_profile

    return cpu_profile().native_bf16


def _rich_callback():
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        """A rich progress bar over optimizer steps, showing the last loss."""

        def __init__(self) -> None:
            self.bar = None
            self.task = None
            self.loss: float | None = None

        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            from ._run import progress_bar

            self.bar = progress_bar("[bold]sft[/bold] {task.description}")
            self.bar.start()
            self.task = self.bar.add_task(
                "loss -", total=state.max_steps, completed=state.global_step
            )

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.update(self.task, description=f"loss {logs['loss']:.4f}")
                # A log file (no live bar) still gets a line every ~5% of the run.
                every = max(1, state.max_steps // 20)
                if not self.bar.console.is_terminal and state.global_step % every == 0:
                    self.bar.console.print(
                        f"sft step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}"
                    )

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.stop()
                self.bar = None

    return RichProgress()


def _finished_state(checkpoint: str | None, max_steps: int) -> dict[str, Any] | None:
    """The checkpoint's trainer state if it already reached ``max_steps`` (else None)."""
    if checkpoint is None or max_steps <= 0:
        return None
    state_file = Path(checkpoint) / "trainer_state.json"
    weights = Path(checkpoint) / "adapter_model.safetensors"
    if not (state_file.is_file() and weights.is_file()):
        return None
    state = json.loads(state_file.read_text())
    return state if int(state.get("global_step", 0)) >= max_steps else None


def _init_adapter_dir(init_adapter: str, model: str) -> Path:
    """The checked directory of ``init_adapter`` (shipped name or directory); raises before any
    model is loaded when it is not an adapter."""
    from aft_graph.adapters import resolve_adapter
    from aft_graph.models import resolve_model

    from .export import adapter_info

    # resolve_model is what load_causal_lm calls too (a cached path once the model is converted).
    directory = resolve_adapter(init_adapter, model_path=resolve_model(model))
    adapter_info(directory)
    return directory


def _load_trainable_adapter(model: Any, directory: Path, base_path: Path) -> Any:
    """``model`` wrapped in the adapter in ``directory``, trainable."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(directory), is_trainable=True)
    # A shipped adapter names its base model, not this machine's copy of it: record the path, as a
    # fresh adapter does, so that `aft-train export` finds the base weights.
    model.peft_config["default"].base_model_name_or_path = str(base_path)
    return model


def train_sft(
    config: SFTConfig,
    *,
    records: Iterable[AggregationRecord] | None = None,
    show_progress: bool = True,
) -> SFTResult:
    """Fine-tune a LoRA adapter on the aggregation examples and save it to ``output_dir/adapter``.

    Resumes from the last checkpoint in ``output_dir/checkpoints`` when ``config.resume``.

    Raises:
        ValueError: no usable example (the report says why every row was skipped).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    started = time.monotonic()
    init_dir = _init_adapter_dir(config.init_adapter, config.model) if config.init_adapter else None
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, base_path = load_causal_lm(config.model, config.dtype)
    report = DataReport(stage="sft examples")
    examples = build_examples(tokenizer, config, records, report)
    if not examples:
        raise ValueError(
            f"no usable training example ({report.summary()}): check the data files "
            f"{[str(p) for p in config.data]}"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    if init_dir is not None:
        model = _load_trainable_adapter(model, init_dir, base_path)
    else:
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)

    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=not on_gpu,
        bf16=use_bf16_autocast(config.mixed_precision, on_gpu=on_gpu, dtype=config.dtype),
        fp16=on_gpu and config.dtype == "float16",
        gradient_checkpointing=config.gradient_checkpointing,
        dataloader_num_workers=0,
    )
    callbacks = [_rich_callback()] if show_progress else []
    trainer = target_logits_trainer()(
        model=model,
        args=args,
        train_dataset=_ListDataset(examples),
        data_collator=CompletionCollator(tokenizer.pad_token_id),
        callbacks=callbacks,
    )
    if show_progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the rich bar shows the loss instead
    resume = None
    if config.resume and (out / "checkpoints").is_dir():
        resume = get_last_checkpoint(str(out / "checkpoints"))
    finished = _finished_state(resume, config.max_steps)
    if finished is not None:
        # The run already reached max_steps: take that checkpoint's adapter, train no further.
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(Path(resume) / "adapter_model.safetensors")))
        history, global_step = finished["log_history"], int(finished["global_step"])
    else:
        trainer.train(resume_from_checkpoint=resume)
        history, global_step = trainer.state.log_history, trainer.state.global_step

    adapter_dir = out / "adapter"
    losses = [(int(h["step"]), float(h["loss"])) for h in history if "loss" in h]
    if trainer.is_world_process_zero():
        model.save_pretrained(adapter_dir)
        log = {
            "base_model": str(base_path),
            "adapter_dir": str(adapter_dir),
            "examples": len(examples),
            "plain_examples": sum(e["kind"] == "plain" for e in examples),
            "steps": global_step,
            "losses": losses,
            "resumed_from": resume,
            "data_report": report.to_dict(),
            "config": json.loads(config.model_dump_json()),
            "runtime_s": round(time.monotonic() - started, 1),
        }
        (out / "sft_log.json").write_text(json.dumps(log, indent=2))
    return SFTResult(
        output_dir=out,
        adapter_dir=adapter_dir,
        examples=len(examples),
        steps=global_step,
        losses=losses,
        runtime_s=time.monotonic() - started,
        resumed_from=resume,
        report=report,
    )
