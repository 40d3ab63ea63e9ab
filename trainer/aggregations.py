"""Aggregation targets: what the aggregator is trained to write for (query, K proposals).

Modes (``AggregationConfig.mode``):

- ``self`` (teacher-free): sample aggregations from the model itself with the inference prompt
  and keep only those the verifier accepts (rejection sampling);
- ``teacher``: a teacher model's aggregation through any backend (verified too, unless
  ``verify=False`` for unverifiable data);
- ``solution`` (the AFT paper's construction, where the target is a good response to the query
  rather than something derived from the proposals): verified answers sampled from the plain
  question prompt (no proposals), paired with the record's proposals in the aggregation prompt.
  It reaches the queries where every proposal is wrong, which ``self`` cannot (its samples are
  pulled to the wrong proposals): the aggregator learns that the proposals are evidence, not
  the answer;
- ``verified_proposal`` (no generation): one of the prompt's own proposals that the verifier
  accepts, preferring one that shows its working over a bare answer; the aggregator learns to pick
  the right proposal and restate it, also when it is in the minority;
- ``reference`` / ``proposal``: pseudo-aggregations that are not derived from the proposals (the
  reference answer; a random kept proposal), for the ablations.

The prompt is :func:`aft_graph.prompts.aggregation_messages` with the template the graph uses, so
the training input is exactly the inference input. One query may give several examples (``keep``
distinct accepted targets): their ids are ``<query id>#<j>`` with ``query_id`` set. Queries with
no accepted target are listed in ``<out>.rejected.jsonl``, so a resumed job does not redo them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from pathlib import Path

from aft_graph.answers import extract_answer
from aft_graph.backends.base import Backend, GenerationRequest, PromptTooLongError, derive_seed
from aft_graph.prompts import TEMPLATES, PromptTemplate, aggregation_messages, proposal_messages
from aft_graph.tasks import Verifier

from ._run import bounded_map, progress
from .config import AggregationConfig
from .records import AggregationRecord, DataReport, JsonlWriter, Proposal, ProposalRecord

__all__ = [
    "aggregation_request",
    "build_aggregations",
    "cap_agreeing",
    "copies_proposal",
    "get_template",
    "rejected_path",
]


def get_template(name: str) -> PromptTemplate:
    """A template of :data:`aft_graph.prompts.TEMPLATES` by name."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregation template {name!r}; known: {', '.join(TEMPLATES)}"
        ) from None


def _leaks_markup(text: str, template: PromptTemplate) -> bool:
    """Whether a target repeats the prompt's proposal markup (``<response id=...>``, ``</response>``)."""
    head = template.proposal.split("{", 1)[0].strip()  # e.g. '<response id="'
    tail = template.proposal.rsplit("}", 1)[-1].strip()  # e.g. '</response>'
    markers = [m for m in (head[:9], tail) if len(m) >= 3 and m.startswith("<")]
    return any(m in text for m in markers)


def _states_format(text: str) -> bool:
    return extract_answer(text, "tag") is not None or extract_answer(text, "boxed") is not None


def rejected_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".rejected.jsonl")


def _proposals_of(record: ProposalRecord, config: AggregationConfig) -> tuple[list[str], list]:
    kept = record.proposals[: config.k] if config.k else record.proposals
    return [p.text for p in kept], [p.reward for p in kept]


def _all_agree(record: ProposalRecord, config: AggregationConfig, verifier: Verifier) -> bool:
    texts, _ = _proposals_of(record, config)
    answers = {verifier.extract(t) for t in texts}
    return len(answers) == 1 and None not in answers


def cap_agreeing(
    records: list[ProposalRecord], config: AggregationConfig, verifier: Verifier
) -> tuple[list[ProposalRecord], int]:
    """Leave out queries whose proposals all state one answer beyond
    ``config.max_agreeing_fraction`` of the result (a seeded choice, so a resumed run makes the
    same one); order is kept.

    Returns:
        The records kept and how many were left out.
    """
    frac = config.max_agreeing_fraction
    if frac >= 1.0:
        return records, 0
    agree = [r.id for r in records if _all_agree(r, config, verifier)]
    n_disagree = len(records) - len(agree)
    allowed = min(len(agree), int(frac / (1.0 - frac) * n_disagree))
    rng = random.Random(derive_seed(config.rng_seed, "cap-agreeing", len(records)))
    kept_agree = set(rng.sample(agree, allowed))
    dropped = set(agree) - kept_agree
    return [r for r in records if r.id not in dropped], len(dropped)


def _shows_working(text: str) -> bool:
    """Whether a response says more than its answer (some reasoning before or around the tag)."""
    bare = re.sub(r"<answer>.*?</answer>|\\boxed\{[^}]*\}", "", text, flags=re.S)
    return len(bare.strip()) >= 20


def _verified_proposal(
    record: ProposalRecord,
    config: AggregationConfig,
    verifier: Verifier,
    template: PromptTemplate,
    report: DataReport,
) -> tuple[str, float] | None:
    """A seeded choice among the accepted, whole, working-showing proposals of the prompt."""
    kept = record.proposals[: config.k] if config.k else record.proposals
    accepted: list[tuple[str, float]] = []
    for p in kept:
        reward = _reward(record, p, verifier)
        if reward < verifier.threshold or not p.text.strip():
            continue
        if config.drop_truncated and p.finish_reason == "length":
            report.note("correct proposals rejected: cut by max_tokens")
            continue
        if _leaks_markup(p.text, template):
            continue
        accepted.append((p.text.strip(), reward))
    if not accepted:
        return None
    reasoned = [a for a in accepted if _shows_working(a[0])]
    if reasoned and len(reasoned) < len(accepted):
        report.note("bare-answer proposals passed over", len(accepted) - len(reasoned))
    rng = random.Random(derive_seed(config.rng_seed, "verified-proposal", record.id))
    return rng.choice(reasoned or accepted)


def _has_accepted_proposal(record: ProposalRecord, config: AggregationConfig, verifier: Verifier) -> bool:
    kept = record.proposals[: config.k] if config.k else record.proposals
    return any(_reward(record, p, verifier) >= verifier.threshold for p in kept)


def _reward(record: ProposalRecord, proposal: Proposal, verifier: Verifier) -> float:
    """The proposal's stored reward, or the verifier's score where selection stored none."""
    return proposal.reward if proposal.reward is not None else verifier.score(record, proposal.text)


def copies_proposal(text: str, proposals: Iterable[str]) -> bool:
    """Whether an aggregation restates one of its proposals verbatim (surrounding space aside)."""
    return text.strip() in {p.strip() for p in proposals}


def _prefer_own_words(
    targets: list[tuple[str, float | None]],
    proposals: list[str],
    config: AggregationConfig,
    report: DataReport,
) -> list[tuple[str, float | None]]:
    """The ``config.keep`` targets to write: aggregations in their own words (and showing their
    working) first; verbatim copies of a proposal last, or never (``config.copies``)."""
    if config.copies == "allow":
        return targets[: config.keep]
    own, copied = [], []
    for target in targets:
        (copied if copies_proposal(target[0], proposals) else own).append(target)
    if copied:
        report.note("accepted aggregations that copy a proposal", len(copied))
    own.sort(key=lambda t: not _shows_working(t[0]))  # stable: sampling order otherwise
    ranked = own if config.copies == "reject" else own + copied
    if own and copied:
        report.note("copies passed over for an aggregation in its own words")
    return ranked[: config.keep]


def aggregation_request(
    record: ProposalRecord, config: AggregationConfig
) -> GenerationRequest:
    """The sampling request for a record's targets: the graph's aggregator prompt (or, in
    ``solution`` mode, the graph's plain proposal prompt), sampled ``config.samples`` times."""
    if config.mode == "solution":
        return GenerationRequest(
            messages=tuple(proposal_messages(record.question)),
            sampling=config.sampling(derive_seed(config.seed, "solution", record.id)),
            lora=config.lora,
        )
    texts, _ = _proposals_of(record, config)
    messages = aggregation_messages(record.question, texts, get_template(config.template))
    return GenerationRequest(
        messages=tuple(messages),
        sampling=config.sampling(derive_seed(config.seed, "aggregation", record.id)),
        lora=config.lora,
    )


async def build_aggregations(
    records: Iterable[ProposalRecord],
    config: AggregationConfig,
    out: str | Path,
    *,
    backend: Backend | None = None,
    verifier: Verifier | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> DataReport:
    """Write AggregationRecords for every record not yet done (resumable, bad rows counted)."""
    template = get_template(config.template)  # fails early on a bad name
    records = list(records)
    report = DataReport(stage=f"aggregations ({config.mode})", read=len(records))
    if config.mode in ("self", "teacher", "solution") and backend is None:
        raise ValueError(f"mode={config.mode!r} samples aggregations: give a backend")
    verifier = verifier or Verifier(config.answer_format, last_number=config.last_number)
    must_verify = config.mode in ("self", "solution") or (config.mode == "teacher" and config.verify)
    records, capped = cap_agreeing(records, config, verifier)
    if capped:
        report.note("left out: all proposals agree (max_agreeing_fraction)", capped)
    if config.require_accepted_proposal and config.mode in ("self", "teacher"):
        solvable = [r for r in records if _has_accepted_proposal(r, config, verifier)]
        if len(solvable) < len(records):
            report.note("left out: no accepted proposal (require_accepted_proposal)", len(records) - len(solvable))
        records = solvable

    with (
        JsonlWriter(out, overwrite=overwrite, key="query_id") as writer,
        JsonlWriter(rejected_path(out), overwrite=overwrite) as rejected,
    ):
        done = writer.done | rejected.done
        todo = [r for r in records if r.id not in done]
        if len(todo) < len(records):
            report.note("already done (resumed)", len(records) - len(todo))

        def emit(record: ProposalRecord, targets: list[tuple[str, float | None]]) -> None:
            texts, rewards = _proposals_of(record, config)
            for j, (target, reward) in enumerate(targets):
                writer.write(
                    AggregationRecord(
                        **{**record.task_fields(), "id": f"{record.id}#{j}"},
                        query_id=record.id,
                        proposals=texts,
                        proposal_rewards=rewards,
                        target=target,
                        target_source=config.mode,
                        target_reward=reward,
                        template=config.template,
                        policy=record.policy,
                    )
                )
                report.kept += 1

        def reject(record: ProposalRecord, reason: str) -> None:
            report.skip(reason, record.id)
            rejected.write({"id": record.id, "reason": reason})

        if config.mode == "verified_proposal":
            for record in todo:
                chosen = _verified_proposal(record, config, verifier, template, report)
                if chosen is None:
                    reject(record, "no accepted proposal")
                    continue
                text, reward = chosen
                if config.append_answer and not _states_format(text):
                    read = verifier.extract(text)
                    if read is not None:
                        text = f"{text}\n{config.reference_format.replace('{answer}', read)}"
                        report.note("targets given the answer format")
                emit(record, [(text, reward)])
            return report

        if config.mode in ("reference", "proposal"):
            for record in todo:
                if config.mode == "reference":
                    if record.answer is None:
                        reject(record, "no reference answer")
                        continue
                    target = config.reference_format.replace("{answer}", record.answer)
                    emit(record, [(target, None)])
                else:
                    texts, _ = _proposals_of(record, config)
                    rng = random.Random(derive_seed(config.rng_seed, "pseudo", record.id))
                    emit(record, [(rng.choice(texts), None)])
            return report

        assert backend is not None
        with progress(
            f"aggregations ({config.mode}, {config.samples}/query)", len(todo), enabled=show_progress
        ) as advance:
            async for record, completions, error in bounded_map(
                todo,
                lambda r: backend.generate(aggregation_request(r, config)),
                concurrency=config.concurrency,
            ):
                advance()
                if error is not None:
                    reason = "over-long prompt" if isinstance(error, PromptTooLongError) else "backend error"
                    reject(record, reason)
                    continue
                report.note("aggregations sampled", len(completions or []))
                targets: list[tuple[str, float | None]] = []
                seen: set[str] = set()
                unverifiable = False
                for c in completions or []:
                    text = c.text.strip()
                    if not text:
                        report.note("empty aggregations")
                        continue
                    if c.finish_reason == "length" and config.drop_truncated:
                        report.note("aggregations rejected: cut by max_tokens")
                        continue
                    if _leaks_markup(text, template):
                        report.note("aggregations rejected: prompt markup in the text")
                        continue
                    reward = None
                    if must_verify:
                        try:
                            reward = verifier.score(record, text)
                        except ValueError as exc:
                            reject(record, "not verifiable")
                            if len(report.examples) < 5:
                                report.examples.append(str(exc)[:300])
                            unverifiable = True
                            break
                        if reward < verifier.threshold:
                            continue
                    report.note("aggregations accepted")
                    if config.append_answer and not _states_format(text):
                        read = verifier.extract(text)
                        if read is not None:
                            text = f"{text}\n{config.reference_format.replace('{answer}', read)}"
                            report.note("targets given the answer format")
                    if text in seen:
                        continue
                    seen.add(text)
                    targets.append((text, reward))
                if unverifiable:
                    continue
                accepted = bool(targets)
                targets = _prefer_own_words(targets, _proposals_of(record, config)[0], config, report)
                if targets:
                    emit(record, targets)
                else:
                    reject(record, "only copies of a proposal accepted" if accepted else "no accepted aggregation")
    return report
