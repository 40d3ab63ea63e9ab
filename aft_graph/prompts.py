"""Prompt templates for proposing, aggregating (AFT / MoA style, RSA style) and refining.

The trainer builds its training examples with these same functions, so what the aggregator sees
at inference is byte for byte what it was fine-tuned on. Users can pass their own
:class:`PromptTemplate` (``AggregateConfig.template``).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = [
    "AFT_TEMPLATE",
    "AFT_VOTE_TEMPLATE",
    "REFINE_TEMPLATE",
    "RSA_TEMPLATE",
    "TEMPLATES",
    "PromptTemplate",
    "aggregation_messages",
    "proposal_messages",
]

Message = dict[str, str]


class PromptTemplate(BaseModel):
    """How a question and K proposals become the aggregator's chat messages.

    Attributes:
        system: Optional system message.
        user: The user turn; must contain ``{question}`` and ``{proposals}``; may contain
            ``{votes}``, replaced by how many proposals state each extracted answer (the vote the
            aggregator should beat, given to it as evidence: :func:`vote_summary`).
        proposal: How one proposal is written; ``{index}`` (1-based) and ``{text}``. Each proposal is
            wrapped in explicit tags so the model (and a reader) can tell where one ends.
        separator: Between proposals.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    system: str | None = None
    user: str
    proposal: str = '<response id="{index}">\n{text}\n</response>'
    separator: str = "\n\n"

    @model_validator(mode="after")
    def _has_slots(self) -> PromptTemplate:
        for slot in ("{question}", "{proposals}"):
            if slot not in self.user:
                raise ValueError(f"the template's user turn must contain {slot}")
        if "{text}" not in self.proposal:
            raise ValueError("the template's proposal format must contain {text}")
        return self

    def format_proposals(self, proposals: Sequence[str]) -> str:
        return self.separator.join(
            self.proposal.format(index=i, text=text.strip()) for i, text in enumerate(proposals, 1)
        )

    def render(self, question: str, proposals: Sequence[str]) -> list[Message]:
        """Chat messages for one aggregation call."""
        # str.replace, not str.format: questions and proposals may hold braces (code, LaTeX).
        user = self.user
        if "{votes}" in user:
            user = user.replace("{votes}", vote_summary(proposals))
        user = user.replace("{proposals}", self.format_proposals(proposals)).replace(
            "{question}", question.strip()
        )
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": user})
        return messages


AFT_TEMPLATE = PromptTemplate(
    system=(
        "You have been provided with a set of responses to the user's query. Synthesize them into "
        "a single, high-quality response. Critically evaluate the information in them, recognizing "
        "that some of it may be biased or incorrect. Do not simply copy the given answers: write a "
        "refined, accurate and comprehensive reply that follows the query's instructions."
    ),
    user="Query:\n{question}\n\nResponses:\n{proposals}\n\nWrite your own best answer to the query.",
)

AFT_VOTE_TEMPLATE = PromptTemplate(
    system=AFT_TEMPLATE.system,
    user=(
        "Query:\n{question}\n\nResponses:\n{proposals}\n\nFinal answers stated: {votes}. The "
        "most frequent answer is not always right: check the responses' reasoning.\n\nWrite your "
        "own best answer to the query."
    ),
)

RSA_TEMPLATE = PromptTemplate(
    user=(
        "You are given a problem and several candidate solutions. Some candidates may be incorrect "
        "or contain errors. Aggregate the useful ideas and produce a single, high-quality "
        "solution. Reason carefully; if candidates disagree, choose the correct path. If all are "
        "incorrect, attempt a different strategy. Follow the problem's instructions on how to "
        "state the final answer.\n\nProblem:\n{question}\n\nCandidate solutions:\n{proposals}\n\n"
        "Now write a single, complete solution."
    ),
)

REFINE_TEMPLATE = PromptTemplate(
    user=(
        "Here is a problem and a previous attempt at it. Check the attempt step by step, fix any "
        "mistake, and write an improved, complete answer. Follow the problem's instructions on how "
        "to state the final answer.\n\nProblem:\n{question}\n\nPrevious attempt:\n{proposals}"
    ),
    proposal="{text}",
)

TEMPLATES: dict[str, PromptTemplate] = {
    "aft": AFT_TEMPLATE,
    "aft-vote": AFT_VOTE_TEMPLATE,
    "rsa": RSA_TEMPLATE,
    "refine": REFINE_TEMPLATE,
}


def vote_summary(proposals: Sequence[str]) -> str:
    """How many proposals state each answer, most frequent first (equivalent forms grouped), e.g.
    ``"12 (2 of 3 responses), 15 (1 of 3)"``. Only answers stated in a final-answer format count
    (an ``<answer>`` tag or ``\\boxed{}``): the rest are "no clear answer", since a last line of
    prose is not a claim the aggregator should weigh."""
    from .answers import extract_answer, group_answers

    answers = [extract_answer(t, "tag") or extract_answer(t, "boxed") for t in proposals]
    groups = sorted(group_answers(answers), key=len, reverse=True)  # stable: ties keep first-seen
    missing = sum(a is None for a in answers)
    n = len(proposals)
    parts = [
        f"{answers[g[0]]} ({len(g)} of {n} responses)" if i == 0 else f"{answers[g[0]]} ({len(g)} of {n})"
        for i, g in enumerate(groups)
    ]
    if missing:
        parts.append(f"no clear answer ({missing} of {n})")
    return ", ".join(parts) or "none"


def proposal_messages(question: str, *, system: str | None = None) -> list[Message]:
    """Chat messages for one proposal: the question as the user turn."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question.strip()})
    return messages


def aggregation_messages(
    question: str, proposals: Sequence[str], template: PromptTemplate = AFT_TEMPLATE
) -> list[Message]:
    """Chat messages for one aggregation call over ``proposals`` (the trainer uses this too)."""
    return template.render(question, proposals)
