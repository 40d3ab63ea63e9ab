"""Top-K selection of proposals per query by a reward.

Rewards (each returns one score per proposal, higher is better):

- :class:`VerifierReward`: the task's own scorer (reasoning-gym ``score_answer``, else math-verify
  against the reference answer), see :class:`aft_graph.tasks.Verifier`;
- :class:`RewardModelReward`: a transformers sequence-classification reward model;
- :class:`JudgeReward`: an LLM judge through any backend (``Score: N`` out of 10);
- :class:`DatasetReward`: scores loaded with off-policy proposals (e.g. UltraFeedback's).

:func:`top_k` keeps exactly ``min(K, n)`` proposals with the highest rewards (ties: the earlier
proposal), records each kept proposal's reward, and by default keeps them in sampling order, as
the aggregator will see proposals at inference.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from aft_graph.backends.base import Backend, GenerationRequest, Sampling
from aft_graph.tasks import Verifier

from ._run import bounded_map, progress
from .config import SelectConfig
from .records import DataReport, JsonlWriter, ProposalRecord

__all__ = [
    "DatasetReward",
    "JudgeReward",
    "Reward",
    "RewardModelReward",
    "VerifierReward",
    "make_reward",
    "select_proposals",
    "top_k",
]


@runtime_checkable
class Reward(Protocol):
    """Scores every proposal of a record."""

    name: str

    async def score(self, record: ProposalRecord) -> list[float]: ...


class VerifierReward:
    """The task's verifier: reasoning-gym's own ``score_answer`` or math-verify (in [0, 1])."""

    name = "verifier"

    def __init__(self, verifier: Verifier | None = None) -> None:
        self.verifier = verifier or Verifier()

    async def score(self, record: ProposalRecord) -> list[float]:
        return [self.verifier.score(record, p.text) for p in record.proposals]


class DatasetReward:
    """Scores that came with the data (off-policy); a proposal without one raises ValueError."""

    name = "dataset"

    async def score(self, record: ProposalRecord) -> list[float]:
        missing = [i for i, p in enumerate(record.proposals) if p.reward is None]
        if missing:
            raise ValueError(
                f"record {record.id!r}: proposals {missing} have no score in the data; load them "
                "with --score-key or pick another reward"
            )
        return [float(p.reward) for p in record.proposals]  # type: ignore[arg-type]


class RewardModelReward:
    """A sequence-classification reward model (transformers), scored on (query, response).

    The pair is rendered with the reward model's chat template (user = query, assistant =
    response) when it has one. One logit: that logit; several: the last class's probability.

    Args:
        model: Local model directory.
        batch_size: Pairs per forward pass.
        max_length: Tokens per pair (longer pairs are truncated).
    """

    name = "reward_model"

    def __init__(self, model: str | Path, *, batch_size: int = 8, max_length: int = 2048) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch.float32)
        self.model.eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.max_length = max_length
        self._lock = asyncio.Lock()

    def _text(self, question: str, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}, {"role": "assistant", "content": response}],
                tokenize=False,
            )
        return f"{question}\n\n{response}"

    def score_texts(self, question: str, responses: list[str]) -> list[float]:
        import torch

        out: list[float] = []
        for i in range(0, len(responses), self.batch_size):
            texts = [self._text(question, r) for r in responses[i : i + self.batch_size]]
            enc = self.tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            )
            with torch.no_grad():
                logits = self.model(**enc).logits.float()
            if logits.shape[-1] == 1:
                out.extend(logits[:, 0].tolist())
            else:
                out.extend(logits.softmax(-1)[:, -1].tolist())
        return out

    async def score(self, record: ProposalRecord) -> list[float]:
        async with self._lock:  # one forward pass at a time; run off the event loop
            return await asyncio.to_thread(self.score_texts, record.question, record.texts())


JUDGE_PROMPT = (
    "Rate the response to the query for correctness and helpfulness on a scale from 1 to 10. "
    "Write one short sentence of justification, then the verdict as 'Score: N'.\n\n"
    "Query:\n{question}\n\nResponse:\n{response}"
)

_SCORE = re.compile(r"score\s*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


class JudgeReward:
    """An LLM judge through any backend; the reward is its ``Score: N`` divided by 10.

    A verdict without a readable score counts as 0 (and is counted in the report's notes).
    """

    name = "judge"

    def __init__(
        self,
        backend: Backend,
        *,
        prompt: str = JUDGE_PROMPT,
        max_tokens: int = 128,
        lora: str | None = None,
    ) -> None:
        if "{question}" not in prompt or "{response}" not in prompt:
            raise ValueError("the judge prompt must contain {question} and {response}")
        self.backend = backend
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.lora = lora
        self.unreadable = 0

    def request(self, question: str, response: str) -> GenerationRequest:
        text = self.prompt.replace("{response}", response.strip()).replace(
            "{question}", question.strip()
        )
        return GenerationRequest(
            messages=({"role": "user", "content": text},),
            sampling=Sampling(temperature=0.0, max_tokens=self.max_tokens),
            lora=self.lora,
        )

    @staticmethod
    def parse(verdict: str) -> float | None:
        found = _SCORE.findall(verdict)
        if not found:
            return None
        return min(max(float(found[-1]), 0.0), 10.0) / 10.0

    async def score(self, record: ProposalRecord) -> list[float]:
        outs = await asyncio.gather(
            *(self.backend.generate(self.request(record.question, p.text)) for p in record.proposals)
        )
        scores = []
        for (completion, *_rest) in outs:
            value = self.parse(completion.text)
            if value is None:
                self.unreadable += 1
            scores.append(value or 0.0)
        return scores


def make_reward(config: SelectConfig, backend: Backend | None = None) -> Reward:
    """The reward a :class:`SelectConfig` names."""
    if config.reward == "verifier":
        return VerifierReward(Verifier(config.answer_format, last_number=config.last_number))
    if config.reward == "dataset":
        return DatasetReward()
    if config.reward == "reward_model":
        if not config.reward_model:
            raise ValueError("reward=reward_model needs --reward-model DIR (a local model directory)")
        return RewardModelReward(config.reward_model)
    if backend is None:
        raise ValueError("reward=judge needs a backend for the judge model (--judge-model)")
    return JudgeReward(backend, max_tokens=config.judge_max_tokens)


def top_k(
    record: ProposalRecord,
    rewards: list[float],
    k: int,
    *,
    min_reward: float | None = None,
    order: str = "original",
    reward_name: str | None = None,
) -> ProposalRecord | None:
    """The record with only its top-``k`` proposals by reward, each carrying its reward.

    Ties go to the earlier proposal. ``order="original"`` keeps the kept proposals in sampling
    order (what the aggregator sees at inference); ``"reward"`` puts the best first. Returns
    ``None`` when ``min_reward`` leaves nothing.
    """
    if len(rewards) != len(record.proposals):
        raise ValueError(
            f"record {record.id!r}: {len(rewards)} rewards for {len(record.proposals)} proposals"
        )
    ranked = sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))
    if min_reward is not None:
        ranked = [i for i in ranked if rewards[i] >= min_reward]
    chosen = ranked[:k]
    if not chosen:
        return None
    if order == "original":
        chosen = sorted(chosen)
    proposals = [
        record.proposals[i].model_copy(update={"reward": float(rewards[i])}) for i in chosen
    ]
    return record.model_copy(update={"proposals": proposals, "selected_by": reward_name})


async def select_proposals(
    records: Iterable[ProposalRecord],
    reward: Reward,
    config: SelectConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    report: DataReport | None = None,
    show_progress: bool = True,
) -> DataReport:
    """Score every record's proposals and write its top-K (resumable, bad rows counted)."""
    records = list(records)
    report = report if report is not None else DataReport(stage=f"select (top-{config.k})")
    if report.read == 0:
        report.read = len(records)
    with JsonlWriter(out, overwrite=overwrite) as writer:
        todo = [r for r in records if r.id not in writer.done]
        if len(todo) < len(records):
            report.note("already written (resumed)", len(records) - len(todo))

        async def score(record: ProposalRecord) -> list[float]:
            return await reward.score(record)

        with progress(f"select by {reward.name}", len(todo), enabled=show_progress) as advance:
            async for record, rewards, error in bounded_map(todo, score, concurrency=8):
                advance()
                if error is not None:
                    report.skip("reward failed", f"{record.id}: {error}")
                    continue
                if len(record.proposals) < config.k:
                    report.note(f"queries with fewer than K={config.k} proposals")
                kept = top_k(
                    record,
                    rewards,
                    config.k,
                    min_reward=config.min_reward,
                    order=config.order,
                    reward_name=reward.name,
                )
                if kept is None:
                    report.skip("no proposal above min_reward", record.id)
                    continue
                writer.write(kept)
                report.kept += 1
    if isinstance(reward, JudgeReward) and reward.unreadable:
        report.note("judge verdicts without a score (counted as 0)", reward.unreadable)
    return report
