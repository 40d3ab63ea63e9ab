"""``build_graph``: propose-and-aggregate as a LangGraph ``StateGraph``.

Topology (every strategy shares it, so comparisons are like for like)::

    prepare ──Send×K──► generate ──► collect ──Send×M──► generate ──► collect ── ... ──► finalize

- ``prepare`` reads the question (``question`` or the last human chat message), checks that the
  prompts will fit the context window and fixes the per-proposal token budget.
- ``generate`` is one generation call; layer 0 proposes, later layers aggregate the texts their
  ``Send`` payload names. Results fan in through a list reducer (``pending``).
- ``collect`` closes a layer: orders its texts, emits a :class:`~aft_graph.events.LayerEvent`, and
  replaces the population with the new texts (``Overwrite``). Its conditional edge fans out the
  next layer or goes to ``finalize``.
- ``finalize`` picks the answer (last / majority / reward) and appends it as an AI message.

With a checkpointer every super-step is saved, so a run interrupted in layer l + 1 resumes there
without regenerating finished layers (or finished calls of the interrupted layer).
"""

from __future__ import annotations

import operator
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import Overwrite, RetryPolicy, Send

from .adaptive import AdaptivePolicy
from .answers import extract_answer
from .backends.base import (
    Backend,
    BackendError,
    BackendUnavailableError,
    GenerationRequest,
    PromptTooLongError,
    derive_seed,
)
from .config import AggregateConfig
from .events import LayerEvent, Usage, emit_layer
from .prompts import aggregation_messages, proposal_messages

__all__ = ["AggregateContext", "RewardFn", "build_graph"]

RewardFn = Callable[[str, str], float | Awaitable[float]]
"""``reward_fn(question, text) -> score`` (sync or async); higher is better."""

_MIN_PROPOSAL_BUDGET = 16  # below this an aggregation prompt carries too little to be useful
_NOTE_TOKENS = 48  # a code-check note appended to a proposal (about 30 words)


@dataclass
class AggregateContext:
    """Per-run context (``graph.ainvoke(..., context=AggregateContext(lora="adapter"))``).

    Attributes:
        lora: LoRA adapter (name or directory) applied to every call of this run, e.g. the AFT
            aggregator trained by ``aft-train``; ``None`` uses the base model.
        aggregator_lora: Adapter for aggregation calls only (overrides ``lora`` there).
    """

    lora: str | None = None
    aggregator_lora: str | None = None


class InputState(TypedDict, total=False):
    """Graph input: a ``question``, or chat ``messages`` (the last human message is the question)."""

    question: str
    messages: Annotated[list[AnyMessage], add_messages]


class OutputState(TypedDict, total=False):
    """Graph output.

    ``selection`` says how the answer was picked: the rule (``last``, ``majority``,
    ``confidence``, ``usc``, ``behaviour``... or a named fallback), the index of the chosen text
    among the texts selected from, and the rule's details.
    """

    answer: str
    layers: list[dict[str, Any]]
    usage: dict[str, int]
    selection: dict[str, Any]
    messages: Annotated[list[AnyMessage], add_messages]


class _State(InputState, OutputState, total=False):
    population: list[str]  # texts of the last finished layer
    pending: Annotated[list[dict[str, Any]], operator.add]  # fan-in of the running layer
    layers: Annotated[list[dict[str, Any]], operator.add]
    layer: int  # index of the layer being generated
    budget: int
    started: float
    # Adaptive compute and selection (aft_graph.adaptive): the population's indices into the last
    # layer's texts and their confidences; the next wave of proposals to send; after an early
    # exit, the agreed text; code-check notes; the model's test inputs; selector-call usage.
    population_ids: list[int]
    confidences: list[float | None]
    wave: list[int]
    early_choice: int | None
    notes: list[str] | None
    test_calls: list[str] | None
    extra_usage: list[dict[str, int]]


class _Task(TypedDict):
    question: str
    layer: int
    index: int
    sources: list[int]
    texts: list[str]
    budget: int
    notes: list[str] | None  # code-check notes on the texts, appended after truncation


def _usage_of(completion: Any) -> dict[str, int]:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens}


def _question_of(state: _State) -> str:
    question = state.get("question")
    if not question:
        for message in reversed(state.get("messages") or []):
            if isinstance(message, HumanMessage) or getattr(message, "type", None) == "human":
                question = message.text if hasattr(message, "text") else str(message.content)
                break
    if not question or not str(question).strip():
        raise ValueError(
            "the question is empty: pass {'question': '...'} or chat messages whose last human "
            "message holds the question"
        )
    return str(question)


def build_graph(
    backend: Backend,
    config: AggregateConfig | None = None,
    *,
    reward_fn: RewardFn | None = None,
    checkpointer: Any = None,
    name: str | None = None,
) -> CompiledStateGraph:
    """Build the propose-and-aggregate graph.

    Args:
        backend: Where every generation goes (vLLM, a `vllm serve` fleet, HF, a chat model...).
        config: Strategy and its sizes; defaults to AFT with K=4, L=1.
        reward_fn: ``(question, text) -> score`` for ``select="reward"`` (best-of-n).
        checkpointer: Any LangGraph checkpointer (e.g. ``AsyncSqliteSaver``) to make runs
            resumable; pass a ``thread_id`` in the run config then.
        name: Name of the compiled graph (shown in traces and as a subgraph node).

    Returns:
        A compiled graph: ``await graph.ainvoke({"question": ...})`` returns ``{"answer", "layers",
        "usage", "messages"}``; each layer is also streamed as a ``LayerEvent``.

    Raises:
        ValueError: ``select="reward"`` without a ``reward_fn``.
    """
    config = config or AggregateConfig()
    if config.resolved_select == "reward" and reward_fn is None:
        raise ValueError(
            f"strategy {config.strategy!r} selects by reward, so build_graph needs "
            "reward_fn=(question, text) -> score"
        )
    depth = config.depth
    template = config.resolved_template
    policy = AdaptivePolicy(config, backend)  # refuses confidence modes without log-probabilities

    def layer_kind(layer: int) -> str:
        if layer == 0:
            return "proposals"
        return "refinement" if config.strategy == "self_refine" else "aggregation"

    def sources_per_call() -> int:
        return {"rsa": config.subset_size, "self_refine": 1}.get(config.strategy, config.proposals)

    def plan_layer(layer: int, population: int) -> list[list[int]]:
        """Which previous-layer texts each call of ``layer`` reads."""
        if layer == 0:
            return [[] for _ in range(config.initial_count)]
        everyone = list(range(population))
        if config.strategy == "rsa":
            rng = random.Random(derive_seed(config.seed, "rsa-subsets", layer))
            k = min(config.subset_size, population)
            return [sorted(rng.sample(everyone, k)) for _ in range(config.population)]
        if config.strategy == "self_refine":
            return [[0]]
        calls = 1 if (config.single_final_aggregation and layer == depth) else config.proposals
        return [everyone for _ in range(calls)]

    def sends(
        question: str,
        layer: int,
        population: list[str],
        budget: int,
        ids: list[int] | None = None,
        notes: list[str] | None = None,
    ) -> list[Send]:
        ids = ids if ids is not None else list(range(len(population)))
        return [
            Send(
                "generate",
                _Task(
                    question=question,
                    layer=layer,
                    index=i,
                    # Sources index the previous layer's texts, also when some were dropped.
                    sources=[ids[j] for j in src],
                    texts=[population[j] for j in src],
                    budget=budget,
                    notes=None if notes is None else [notes[j] for j in src],
                ),
            )
            for i, src in enumerate(plan_layer(layer, len(population)))
        ]

    def wave_sends(question: str, indices: list[int]) -> list[Send]:
        return [
            Send("generate", _Task(question=question, layer=0, index=i, sources=[], texts=[], budget=0))
            for i in indices
        ]

    async def call(request: GenerationRequest) -> Any:
        """A selector call outside the layers (USC's pick, the model's test inputs)."""
        (completion,) = await backend.generate(request)
        return completion

    def prepare(state: _State) -> dict[str, Any]:
        question = _question_of(state)
        budget = 0
        proposal = GenerationRequest(
            messages=tuple(proposal_messages(question, system=config.proposal_system)),
            sampling=config.proposer.to_sampling(None),
        )
        if backend.count_prompt_tokens(proposal) >= backend.context_window:
            raise PromptTooLongError(
                f"the question alone ({backend.count_prompt_tokens(proposal)} tokens) fills the "
                f"model's context window ({backend.context_window}): shorten it or use a model "
                "with a longer context"
            )
        if depth > 0:
            empty = GenerationRequest(
                messages=tuple(template.render(question, [""] * sources_per_call())),
                sampling=config.aggregator.to_sampling(None),
            )
            room = (
                backend.context_window
                - backend.count_prompt_tokens(empty)
                - config.aggregator.max_tokens
                - 8 * sources_per_call()  # joins between proposals may tokenize differently
            )
            budget = room // sources_per_call()
            if config.code_checks:
                budget -= _NOTE_TOKENS  # room for the note on what running each proposal showed
            if config.proposal_token_budget is not None:
                budget = min(budget, config.proposal_token_budget)
            if budget < _MIN_PROPOSAL_BUDGET:
                raise PromptTooLongError(
                    f"an aggregation prompt with {sources_per_call()} proposals leaves only "
                    f"{max(budget, 0)} tokens per proposal in the {backend.context_window}-token "
                    f"context window (aggregator max_tokens={config.aggregator.max_tokens}): "
                    "lower the aggregator's max_tokens or the number of proposals per call, or "
                    "raise the engine's max_model_len"
                )
        return {
            "question": question,
            "layer": 0,
            "budget": budget,
            "population": [],
            "pending": Overwrite([]),
            "layers": Overwrite([]),
            "started": time.monotonic(),
            "wave": [],
            "early_choice": None,
            "notes": None,
            "test_calls": None,
            "extra_usage": [],
        }

    def start_layer0(state: _State) -> list[Send]:
        return wave_sends(state["question"], list(range(policy.first_wave())))

    async def generate(task: _Task, runtime: Runtime[AggregateContext]) -> dict[str, Any]:
        layer, index = task["layer"], task["index"]
        ctx = runtime.context or AggregateContext()
        truncated = 0
        if layer == 0:
            messages = proposal_messages(task["question"], system=config.proposal_system)
            sampling = config.proposer.to_sampling(
                derive_seed(config.seed, layer, index), logprobs=policy.logprobs
            )
            lora = ctx.lora
        else:
            fitted = []
            for text in task["texts"]:
                cut = backend.truncate(text, task["budget"])
                truncated += cut != text
                fitted.append(cut)
            if task.get("notes"):
                fitted = [f"{t}\n\n[{n}]" for t, n in zip(fitted, task["notes"], strict=True)]
            messages = aggregation_messages(task["question"], fitted, template)
            sampling = config.aggregator.to_sampling(
                derive_seed(config.seed, layer, index), logprobs=policy.logprobs
            )
            lora = ctx.aggregator_lora or ctx.lora
        request = GenerationRequest(messages=tuple(messages), sampling=sampling, lora=lora)
        record: dict[str, Any] = {
            "layer": layer,
            "index": index,
            "sources": task["sources"],
            "truncated": truncated,
        }
        try:
            (completion,) = await backend.generate(request)
        except BackendUnavailableError:
            raise  # transient: the node's RetryPolicy tries again
        except BackendError as exc:
            return {"pending": [{**record, "error": f"{type(exc).__name__}: {exc}"}]}
        return {"pending": [{**record, **policy.record(completion), "error": None}]}

    async def collect(state: _State) -> dict[str, Any]:
        layer = state["layer"]
        done = sorted(state.get("pending") or [], key=lambda r: r["index"])
        ok = [r for r in done if r["error"] is None]
        failures = [f"call {r['index']}: {r['error']}" for r in done if r["error"] is not None]
        if not ok:
            raise BackendError(
                f"every generation call of layer {layer} failed ({'; '.join(failures)}); finished "
                "layers are kept in the checkpoint if a checkpointer was given"
            )
        texts = [r["text"] for r in ok]
        answers = [extract_answer(t, config.answer_format) for t in texts]
        saved, waves, probability = 0, [], None
        if layer == 0 and config.adaptive_width:
            more, probability = policy.next_wave(answers, len(done))
            if more:  # not sure yet: sample the next wave into the same layer
                return {"wave": list(range(len(done), len(done) + more))}
            waves = policy.waves_of(len(done))
            saved = config.initial_count - len(done)
        confidences = [r.get("confidence") for r in ok] if policy.logprobs else None
        decision = policy.close_layer(layer, depth, answers, confidences)
        kept = decision.kept if decision.kept is not None else list(range(len(texts)))
        if decision.stopped_early:
            saved += sum(len(plan_layer(later, len(kept))) for later in range(layer + 1, depth + 1))
        extra: dict[str, Any] = {}
        checks = None
        if config.code_checks and layer < depth and not decision.stopped_early:
            test_calls = state.get("test_calls")
            if test_calls is None:
                test_calls, completion = await policy.test_inputs(state["question"], call)
                extra["test_calls"] = test_calls
                if completion is not None:
                    extra["extra_usage"] = [*state.get("extra_usage", []), _usage_of(completion)]
            checks = await policy.code_notes(state["question"], texts, test_calls)
        event = LayerEvent(
            layer=layer,
            kind=layer_kind(layer),
            texts=texts,
            answers=answers,
            sources=[r["sources"] for r in ok],
            prompt_tokens=[r["prompt_tokens"] for r in ok],
            completion_tokens=[r["completion_tokens"] for r in ok],
            finish_reasons=[r["finish_reason"] for r in ok],
            truncated=sum(r["truncated"] for r in done),
            proposal_budget=state["budget"] if layer > 0 else None,
            failures=failures,
            elapsed_s=round(time.monotonic() - state.get("started", time.monotonic()), 3),
            confidences=confidences,
            kept=decision.kept,
            waves=waves,
            stop_probability=probability,
            agreement=decision.agreement,
            stopped_early=decision.stopped_early,
            saved_calls=saved,
            checks=checks,
        )
        await emit_layer(event)
        return {
            **extra,
            "population": [texts[i] for i in kept],
            "population_ids": kept,
            "confidences": [confidences[i] for i in kept] if confidences is not None else [],
            "notes": None if checks is None else [checks[i] for i in kept],
            "pending": Overwrite([]),
            "layers": [event.model_dump()],
            "layer": depth + 1 if decision.stopped_early else layer + 1,
            "early_choice": decision.choice if decision.stopped_early else None,
            "wave": [],
            "started": time.monotonic(),
        }

    def next_layer(state: _State) -> list[Send] | str:
        if state.get("wave"):
            return wave_sends(state["question"], state["wave"])
        if state["layer"] > depth:
            return "finalize"
        return sends(
            state["question"],
            state["layer"],
            state["population"],
            state["budget"],
            state.get("population_ids"),
            state.get("notes"),
        )

    async def finalize(state: _State) -> dict[str, Any]:
        texts = state["population"]
        test_calls = state.get("test_calls")
        extra_usage = list(state.get("extra_usage") or [])
        if config.resolved_select == "behaviour" and test_calls is None:
            test_calls, completion = await policy.test_inputs(state["question"], call)
            if completion is not None:
                extra_usage.append(_usage_of(completion))
        selection = await policy.select(
            state["question"],
            texts,
            [extract_answer(t, config.answer_format) for t in texts],
            state.get("confidences") or None,
            call=call,
            reward_fn=reward_fn,
            test_calls=test_calls or (),
            early_choice=state.get("early_choice"),
        )
        choice = selection.index
        usage = Usage.from_layers([LayerEvent.model_validate(d) for d in state["layers"]])
        for u in [*extra_usage, *map(_usage_of, selection.calls)]:
            usage.add_call(u["prompt_tokens"], u["completion_tokens"])
        return {
            "answer": texts[choice],
            "usage": usage.model_dump(),
            "selection": {"index": choice, "rule": selection.rule, **selection.detail},
            "messages": [AIMessage(content=texts[choice], name=name)],
        }

    retry = RetryPolicy(max_attempts=config.max_retries, retry_on=BackendUnavailableError)
    builder = StateGraph(
        _State, context_schema=AggregateContext, input_schema=InputState, output_schema=OutputState
    )
    builder.add_node("prepare", prepare)
    builder.add_node("generate", generate, retry_policy=retry)
    builder.add_node("collect", collect)
    builder.add_node("finalize", finalize)
    builder.add_edge(START, "prepare")
    builder.add_conditional_edges("prepare", start_layer0, ["generate"])
    builder.add_edge("generate", "collect")
    builder.add_conditional_edges("collect", next_layer, ["generate", "finalize"])
    builder.add_edge("finalize", END)
    return builder.compile(checkpointer=checkpointer, name=name or "aft_graph")
