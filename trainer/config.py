"""Configuration of every stage of the AFT recipe (pydantic, each field with its help text).

The command line (:mod:`trainer.cli`) takes its option help from these descriptions, and every
command also accepts ``--config FILE.json`` holding any of these fields. The ablations of the AFT
paper are configuration, not code:

- no proposals in the input (plain SFT): ``SFTConfig(input_mode="plain")``;
- pseudo-aggregations (targets not derived from the proposals):
  ``AggregationConfig(mode="reference")`` (the reference answer) or ``mode="proposal"``
  (a random kept proposal);
- on- vs off-policy proposals: ``aft-train proposals`` (sampled from the model being trained)
  vs ``aft-train proposals --from-data FILE`` (:class:`OffPolicyConfig`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from aft_graph.answers import AnswerFormat
from aft_graph.backends.base import Sampling
from aft_graph.tasks import EVALUATION_SUITES, TaskSpec

from .tasks import DEFAULT_MIX

__all__ = [
    "AggregationConfig",
    "DemoConfig",
    "OffPolicyConfig",
    "ProposalConfig",
    "SFTConfig",
    "SelectConfig",
    "help_of",
]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


def help_of(config: type[BaseModel], field: str) -> str:
    """The description of a config field (the CLI's option help)."""
    return config.model_fields[field].description or ""


class _SampledConfig(_Config):
    """A stage that samples from a model: subclasses define the sampling fields and defaults."""

    samples: int
    temperature: float
    top_k: int | None
    top_p: float
    max_tokens: int

    def sampling(self, seed: int | None = None) -> Sampling:
        """The stage's sampling settings for one request (``seed``: that request's seed)."""
        return Sampling(
            n=self.samples,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            seed=seed,
        )


class ProposalConfig(_SampledConfig):
    """On-policy proposals: sampled from the model being trained, through any backend."""

    mode: Literal["auto", "chat", "icl"] = Field(
        "auto",
        description="chat: the question as a chat turn (instruct models, the graph's own proposal "
        "prompt); icl: a raw few-shot prompt (base models); auto: icl when the backend's "
        "tokenizer has no chat template, else chat.",
    )
    samples: int = Field(4, ge=1, description="Proposals sampled per query.")
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="Sampling temperature.")
    top_k: int | None = Field(50, ge=0, description="Top-k sampling (0/None: off).")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(256, ge=1, description="Maximum new tokens per proposal.")
    seed: int | None = Field(
        0, description="Base seed: each query's request gets a seed derived from it and the query "
        "id (reproducible sampling; None: unseeded)."
    )
    system: str | None = Field(None, description="System message of chat proposals.")
    icl_shots: int = Field(
        3, ge=0, description="icl mode: worked examples (other queries with their reference "
        "answers) in front of each question."
    )
    drop_truncated: bool = Field(
        False, description="Drop proposals cut by max_tokens (finish_reason=length)."
    )
    concurrency: int = Field(16, ge=1, description="Requests in flight at once.")
    lora: str | None = Field(None, description="LoRA adapter to sample from (iterated rounds).")


class OffPolicyConfig(_Config):
    """Off-policy proposals: several responses per prompt read from a data set.

    The default fields follow UltraFeedback's layout: ``{"prompt": ..., "completions":
    [{"response": ..., "overall_score": ...}, ...]}``.
    """

    source: str = Field(
        description="A .jsonl/.json file, a directory written by datasets' save_to_disk, or "
        "anything datasets.load_dataset() reads locally (parquet/json directory)."
    )
    split: str = Field("train", description="Split to read (HF datasets).")
    prompt_field: str = Field("prompt", description="Field holding the query.")
    responses_field: str = Field(
        "completions", description="Field holding the list of responses."
    )
    response_key: str | None = Field(
        "response",
        description="Key of the text inside each response object (None: responses are strings).",
    )
    score_key: str | None = Field(
        None,
        description="Key of a score inside each response object (e.g. overall_score); kept as "
        "the proposal's reward so that --reward dataset can select by it.",
    )
    answer_field: str | None = Field(None, description="Field with a reference answer, if any.")
    id_field: str | None = Field(None, description="Field with a row id (default: row number).")
    limit: int | None = Field(None, ge=1, description="Read at most this many rows.")


class SelectConfig(_Config):
    """Top-K selection of proposals per query by a reward."""

    reward: Literal["verifier", "reward_model", "judge", "dataset"] = Field(
        "verifier",
        description="verifier: the task's own scorer (reasoning-gym score_answer, math-verify); "
        "reward_model: a transformers sequence-classification model; judge: an LLM through a "
        "backend; dataset: scores loaded with the proposals (off-policy).",
    )
    k: int = Field(4, ge=1, description="Proposals kept per query (top-K by reward).")
    min_reward: float | None = Field(
        None, description="Also drop proposals below this reward (rows left empty are skipped)."
    )
    answer_format: AnswerFormat = Field(
        "auto", description="Where the verifier looks for the answer (tag, boxed, text, auto)."
    )
    last_number: bool = Field(
        False,
        description="Verifier: without an <answer> tag or \\boxed{}, read the last number stated "
        "(lenient, for numeric tasks and weak models).",
    )
    reward_model: str | None = Field(
        None, description="reward_model: local model directory of a sequence-classification model."
    )
    judge_max_tokens: int = Field(128, ge=8, description="judge: tokens for the verdict.")
    order: Literal["original", "reward"] = Field(
        "original",
        description="Order of the kept proposals: original (sampling order, as at inference) or "
        "reward (best first).",
    )


class AggregationConfig(_SampledConfig):
    """Aggregation targets: from a teacher, teacher-free (self + verifier), or pseudo (ablation)."""

    mode: Literal["self", "teacher", "solution", "verified_proposal", "reference", "proposal"] = Field(
        "self",
        description="self: sample aggregations from the model itself with the inference prompt and "
        "keep only verifier-accepted ones (rejection sampling); teacher: a teacher model's "
        "aggregation through any backend; solution: the AFT paper's construction: the target is a "
        "verified answer to the query sampled without the proposals (plain prompt; optionally "
        "with a LoRA), paired with the proposals in the aggregation prompt, so the aggregator "
        "learns to answer right also where every proposal is wrong; verified_proposal: a proposal of the prompt that the "
        "verifier accepts, copied (no generation: the aggregator learns to pick and restate the "
        "right one); reference / proposal: pseudo-aggregations not derived from the proposals "
        "(the reference answer / a random kept proposal) for ablations.",
    )
    max_agreeing_fraction: float = Field(
        1.0, ge=0.0, le=1.0,
        description="At most this fraction of the queries sent to the targets stage may have "
        "proposals that all state the same answer (voting already handles those); the rest of "
        "them are left out, chosen by rng_seed. 1.0: no cap.",
    )
    require_accepted_proposal: bool = Field(
        False,
        description="self / teacher: sample only for queries with at least one verifier-accepted "
        "proposal among the K (without one, an accepted aggregation is rare for a small model and "
        "its samples are mostly spent for nothing).",
    )
    copies: Literal["allow", "prefer_other", "reject"] = Field(
        "prefer_other",
        description="self / teacher: what to do with accepted aggregations that restate one of "
        "the prompt's proposals verbatim (targets that copy teach copying: the verified_proposal "
        "adapter copied 95 of 120 held-out aggregations). prefer_other: keep them only when no "
        "accepted aggregation says something of its own; reject: never keep them.",
    )
    samples: int = Field(4, ge=1, description="Aggregations sampled per query (self / teacher).")
    keep: int = Field(1, ge=1, description="Accepted targets kept per query (distinct texts).")
    verify: bool = Field(
        True,
        description="Keep only targets the verifier accepts (always on in self mode; teacher mode "
        "may turn it off for unverifiable data).",
    )
    drop_truncated: bool = Field(
        True, description="Reject targets cut by max_tokens (finish_reason=length): not a whole answer."
    )
    temperature: float = Field(0.8, ge=0.0, le=5.0, description="Sampling temperature.")
    top_k: int | None = Field(50, ge=0, description="Top-k sampling.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(256, ge=1, description="Maximum new tokens per aggregation.")
    seed: int | None = Field(0, description="Base seed of the requests (see ProposalConfig).")
    template: str = Field(
        "aft", description="Aggregation prompt template from aft_graph.prompts.TEMPLATES."
    )
    k: int | None = Field(
        None, ge=1, description="Proposals per prompt (first K of each record; None: all)."
    )
    answer_format: AnswerFormat = Field("auto", description="Where the verifier finds answers.")
    last_number: bool = Field(
        False, description="Verifier: without a tag or \\boxed{}, read the last number stated."
    )
    reference_format: str = Field(
        "<answer>{answer}</answer>",
        description="How an answer is written in a target ({answer}): the whole target in "
        "mode=reference, the appended line with append_answer.",
    )
    append_answer: bool = Field(
        False,
        description="An accepted target that states its answer without an <answer> tag or "
        "\\boxed{} gets reference_format (filled with the answer the verifier read from it) "
        "appended, so that every target ends in the format the question asks for.",
    )
    concurrency: int = Field(16, ge=1, description="Requests in flight at once.")
    lora: str | None = Field(
        None, description="LoRA adapter of the sampling model (self / solution mode)."
    )
    rng_seed: int = Field(0, description="Seed of the random choices (mode=proposal).")


class SFTConfig(_Config):
    """LoRA fine-tuning of the aggregator (peft + transformers Trainer; `accelerate launch` scales it)."""

    model: str = Field("small", description="Base model: 'small', 'default' or a model directory.")
    data: tuple[Path, ...] = Field(description="AggregationRecord jsonl file(s).")
    output_dir: Path = Field(description="Run directory: checkpoints/, adapter/, sft_log.json.")
    input_mode: Literal["aggregation", "plain"] = Field(
        "aggregation",
        description="aggregation: (query + proposals -> target), the AFT input; plain: (query -> "
        "target) with no proposals (the plain-SFT ablation).",
    )
    plain_fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Add plain (query -> response) examples: this fraction of the aggregation "
        "examples' count, taken from --plain-data or else from the targets themselves.",
    )
    plain_data: Path | None = Field(
        None, description="jsonl of plain examples: records with a question and a target, or "
        "ProposalRecords (their best proposal is the response)."
    )
    template: str | None = Field(
        None, description="Override the records' aggregation template (aft_graph.prompts)."
    )
    max_seq_len: int = Field(2048, ge=16, description="Longer examples are skipped (counted).")
    lora_r: int = Field(8, ge=1, le=256, description="LoRA rank (vLLM engines cap it: max_lora_rank).")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj"), description="Modules that get adapters."
    )
    init_adapter: str | None = Field(
        None,
        description="Continue training this LoRA adapter (a shipped name such as 'aft', or an "
        "adapter directory) instead of a fresh one: its rank, alpha and target modules replace "
        "lora_r, lora_alpha and target_modules (a second stage of training on new data).",
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the data (ignored with max_steps).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: epochs).")
    batch_size: int = Field(4, ge=1, description="Examples per device per step.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    lr_scheduler: str = Field("linear", description="transformers scheduler name.")
    weight_decay: float = Field(0.0, ge=0.0)
    logging_steps: int = Field(1, ge=1, description="Log the loss every N steps.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps.")
    save_total_limit: int | None = Field(2, description="Checkpoints kept.")
    resume: bool = Field(
        True, description="Resume from the last checkpoint in output_dir/checkpoints if any."
    )
    seed: int = Field(0, description="Training seed (data order, LoRA init).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Training dtype (float32 on a CPU)."
    )
    mixed_precision: Literal["auto", "bf16", "no"] = Field(
        "auto",
        description="bfloat16 autocast (Trainer's bf16=True). auto: on where the hardware computes "
        "bfloat16 natively (a GPU that supports it; a CPU with AVX-512 BF16 or AMX, where the LoRA "
        "step of the default model took 10 s instead of 21 s), off elsewhere (AVX2-only CPUs "
        "emulate bfloat16 and get slower).",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    shuffle_proposals: bool = Field(
        False, description="Shuffle each example's proposals (position robustness)."
    )
    drop_copies: bool = Field(
        False,
        description="Skip examples whose target restates one of its proposals verbatim (counted): "
        "such targets teach copying. Lets data written under copies=prefer_other train as if "
        "it had been written under copies=reject.",
    )

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if not self.data:
            raise ValueError("give at least one data file (AggregationRecord jsonl)")
        return self


class DemoConfig(_Config):
    """The whole recipe on a reasoning-gym task mix (``aft-train demo``; defaults: the CPU demo
    on the small model; :func:`trainer.recipe.run_recipe` runs it for any model and sizes)."""

    out: Path = Field(Path("runs/train-demo"), description="Run directory.")
    model: str = Field("small", description="Model to train (and to sample from).")
    train_size: int = Field(40, ge=2, description="Training queries.")
    eval_size: int = Field(16, ge=1, description="Held-out queries (before/after comparison).")
    seed: int = Field(0, description="Training seed (SFT data order, LoRA initialization).")
    mix: tuple[TaskSpec, ...] = Field(
        DEFAULT_MIX, description="reasoning-gym data sets (families) and configs of the queries."
    )
    task_seed: int = Field(
        100_000,
        description="Seed of the training queries (held-out: +1,000,000); far from the evaluation "
        "suites' seeds, and checked disjoint from them.",
    )
    eval_suites: tuple[str, ...] = Field(
        tuple(EVALUATION_SUITES),
        description="Evaluation suites the queries must be disjoint from (aft_graph.tasks).",
    )
    answer_format: Literal["tag", "boxed", "think"] = Field(
        "tag",
        description="How answers are asked for (think: step-by-step reasoning, then the answer in "
        "<answer> tags, as the evaluation suites ask).",
    )
    last_number: bool = Field(
        True,
        description="Lenient verifier: a response without an <answer> tag is read by its last "
        "number (the small model rarely follows the format instruction; the report also gives "
        "the rate of tagged answers).",
    )
    proposals: int = Field(6, ge=1, description="Proposals sampled per query.")
    k: int = Field(4, ge=1, description="Proposals kept per query (top-K by the verifier).")
    proposal_tokens: int = Field(64, ge=8, description="Max tokens per proposal.")
    aggregation_samples: int = Field(6, ge=1, description="Self-aggregations sampled per query.")
    aggregation_temperature: float = Field(0.7, ge=0.0, description="Self-aggregation temperature.")
    aggregation_tokens: int = Field(64, ge=8, description="Max tokens per aggregation.")
    keep: int = Field(2, ge=1, description="Verified aggregations kept per query.")
    append_answer: bool = Field(
        True,
        description="Append '<answer>N</answer>' (N: the answer the verifier read) to accepted "
        "targets that lack the tag, so the adapter learns the requested format.",
    )
    mode: Literal["self", "verified_proposal", "reference", "proposal"] = Field(
        "self",
        description="Aggregation targets (self = teacher-free rejection sampling; "
        "verified_proposal = an accepted proposal of the prompt, no generation).",
    )
    max_agreeing_fraction: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Cap on the share of training queries whose proposals all agree.",
    )
    require_accepted_proposal: bool = Field(
        False,
        description="Self-aggregation: sample targets only for queries with a verifier-accepted "
        "proposal among the K (see AggregationConfig).",
    )
    copies: Literal["allow", "prefer_other", "reject"] = Field(
        "prefer_other",
        description="Self-aggregation: accepted aggregations that copy a proposal verbatim "
        "(see AggregationConfig).",
    )
    solution_fallback: bool = Field(
        False,
        description="After the self targets, give every selected query still without one (no "
        "accepted proposal, or no accepted aggregation) a `solution` target: a verified answer "
        "sampled from the plain question prompt, paired with the query's proposals "
        "(aggregations_solution.jsonl; SFT trains on both files).",
    )
    solution_samples: int = Field(4, ge=1, description="Solutions sampled per query (solution_fallback).")
    solution_lora: str | None = Field(
        None,
        description="LoRA adapter (a shipped name such as 'aft', or a directory) of the model that "
        "samples the solution targets; None: the model being trained.",
    )
    aggregation_k: int | None = Field(
        None, ge=1,
        description="Proposals in each training (and held-out) aggregation prompt: the first N "
        "of the k kept, in sampling order (None: k). Lets selection keep every proposal, unbiased, "
        "while the aggregator trains at the width it is evaluated at.",
    )
    heldout_samples: int | None = Field(
        None, ge=1,
        description="Proposals sampled per held-out query (None: k); more than the aggregator "
        "reads gives the larger self-consistency baselines on the same samples.",
    )
    proposal_limit: int | None = Field(
        None, ge=1,
        description="Sample proposals for only the first N training queries in this run (a "
        "later run with a higher limit or none continues where it stopped).",
    )
    steps: int = Field(30, ge=1, description="SFT optimizer steps.")
    batch_size: int = Field(4, ge=1, description="SFT examples per forward pass.")
    grad_accum: int = Field(
        1, ge=1,
        description="Forward passes per optimizer step (examples per step: batch_size x "
        "grad_accum). Long aggregation prompts need a small batch_size: the logits of a 150k "
        "vocabulary take about 0.6 MB per token in float32.",
    )
    learning_rate: float = Field(5e-4, gt=0)
    lora_r: int = Field(8, ge=1, le=16)
    max_model_len: int = Field(2048, ge=256, description="vLLM context window.")
    merged: bool = Field(True, description="Also export a merged model directory.")
    data_dir: Path | None = Field(
        None,
        description="Pack the run's jsonl data here (gzipped, with a manifest; commit it) after "
        "every stage, and restore it from here first: a run continues on another machine.",
    )
    inherit_data: Path | None = Field(
        None,
        description="The data directory of an earlier recipe whose query, proposal and held-out "
        "stages this run shares (an ablation of targets or training): inherit_files are "
        "restored from it first and not packed again while unchanged.",
    )
    inherit_files: tuple[str, ...] = Field(
        (
            "tasks_train.jsonl", "tasks_eval.jsonl", "proposals.jsonl", "selected.jsonl",
            "eval_proposals.jsonl", "heldout_base.json",
        ),
        description="The files restored from inherit_data (the stages before the targets, and "
        "the untrained aggregator's held-out evaluation).",
    )  # fmt: skip
