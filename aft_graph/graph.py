"""``build_graph``: propose-and-aggregate as a LangGraph ``StateGraph``.

(About 600 lines, on purpose: the nodes are closures over one configuration and one backend, and
keeping them together keeps the whole topology readable in one place. The guarded generation
call itself lives in :mod:`aft_graph.calls`.)

Topology (every strategy shares it, so comparisons are like for like)::

    prepare ──Send×K──► propose ──► collect_layer ──Send×M──► aggregate ──► collect_layer ── ...
                                                                                  ──► finalize

- ``prepare`` reads the question (``question`` or the last human chat message), checks that the
  prompts will fit the context window and fixes the per-proposal token budget.
- ``propose`` is one proposal call (layer 0); ``aggregate`` is one aggregation (or refinement)
  call of a later layer, reading the texts its ``Send`` payload names. Both fan in through a list
  reducer (``pending``), so the drawing and traces show the method: proposals fan in to
  aggregators.
- ``collect_layer`` is the layer barrier: it orders the layer's texts, emits a
  :class:`~aft_graph.events.LayerEvent`, and replaces the population with the new texts
  (``Overwrite``). Its conditional edge fans out the next layer or goes to ``finalize``.
- ``finalize`` picks the answer (last / majority / reward / confidence / usc / behaviour) and
  appends it as an AI message.

Adaptive compute (decided in :mod:`aft_graph.adaptive`): with ``adaptive_width`` the proposals
come in waves, ``collect_layer`` sending the next wave of ``propose`` calls into the same layer
until the stopping rule is sure; with ``early_exit`` a layer whose answers agree goes straight to
``finalize``. Selector calls outside the layers (USC's pick, the model's test inputs for code) are
guarded like every other call and counted in ``usage``.

With a checkpointer every super-step is saved, so a run interrupted in layer l + 1 resumes there
without regenerating finished layers (or finished calls of the interrupted layer).

Failures (see :mod:`aft_graph.calls`): a call that fails (error, timeout, empty text, a backend
breaking its contract, a transient error after ``max_retries`` attempts) is recorded in its layer's
``failures`` and the layer goes on with the survivors. A layer left with fewer than
``min_survivors`` successful calls gives its failed calls one more attempt, each of which must
succeed; the first that fails stops the run with a :class:`~aft_graph.calls.LayerFailedError`.
Those attempts are the pending tasks of the checkpoint, so ``ainvoke(None, config)`` on the same
thread retries exactly them once the cause is fixed.
"""

from __future__ import annotations

import operator
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.channels.ephemeral_value import EphemeralValue
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import Overwrite, RetryPolicy, Send
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12 (JSON schemas)

from .adaptive import AdaptivePolicy
from .backends.base import (
    Backend,
    BackendUnavailableError,
    GenerationRequest,
    PromptTooLongError,
    derive_seed,
)
from .calls import (
    CallFailure,
    LayerFailedError,
    LayerUnavailableError,
    RunClock,
    check_backend,
    guarded_generate,
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
    """Graph input: a ``question``, or chat ``messages`` (the last human message is the question).

    ``question`` is read by this turn only (an ephemeral channel): a later turn on the same
    checkpointed thread that sends only messages is not answered with an earlier question.
    """

    question: Annotated[str, EphemeralValue(str)]
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
    asked: str  # the question of the current turn, as prepare read it
    population: list[str]  # texts of the last finished layer
    pending: Annotated[list[dict[str, Any]], operator.add]  # fan-in of the running layer
    layers: Annotated[list[dict[str, Any]], operator.add]
    layer: int  # index of the layer being generated
    budget: int
    started: float
    retry: list[dict[str, Any]]  # failed calls of a layer below min_survivors, to try once more
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


class _Task(TypedDict, total=False):
    question: str
    layer: int
    index: int
    sources: list[int]
    texts: list[str]
    budget: int
    must_succeed: dict[str, Any]  # set on the last try of a layer below its minimum
    notes: list[str] | None  # code-check notes on the texts, appended after truncation


def _usage_of(completion: Any) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "cached_prompt_tokens": getattr(completion, "cached_prompt_tokens", 0),
    }


def _question_of(state: _State) -> str:
    question = state.get("question")
    if question is None:
        for message in reversed(state.get("messages") or []):
            if isinstance(message, HumanMessage) or getattr(message, "type", None) == "human":
                question = message.text if hasattr(message, "text") else message.content
                break
    if question is not None and not isinstance(question, str):
        raise TypeError(
            f"the question must be text, got {type(question).__name__} ({question!r:.60}): pass "
            "{'question': 'What is 2 + 2?'}"
        )
    if not question or not question.strip():
        raise ValueError(
            "the question is empty: pass {'question': '...'} or chat messages whose last human "
            "message holds the question"
        )
    return question


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
        TypeError: ``backend`` is not a generation backend, or ``config`` not an AggregateConfig.
        ValueError: ``select="reward"`` without a ``reward_fn``.
    """
    check_backend(backend)
    config = AggregateConfig() if config is None else config
    if not isinstance(config, AggregateConfig):
        raise TypeError(
            f"config must be an AggregateConfig, got {type(config).__name__}: pass "
            "AggregateConfig(proposals=4, layers=1) (or AggregateConfig(**your_dict))"
        )
    if config.resolved_select == "reward" and reward_fn is None:
        raise ValueError(
            f"strategy {config.strategy!r} selects by reward, so build_graph needs "
            "reward_fn=(question, text) -> score"
        )
    depth = config.depth
    template = config.resolved_template
    policy = AdaptivePolicy(config, backend)  # refuses confidence modes without log-probabilities
    clock = RunClock()

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

    def node_of(layer: int) -> str:
        return "propose" if layer == 0 else "aggregate"

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
                node_of(layer),
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
        """Proposal calls ``indices`` (a wave of ``adaptive_width``, or all of them)."""
        return [
            Send("propose", _Task(question=question, layer=0, index=i, sources=[], texts=[], budget=0))
            for i in indices
        ]

    def selector_call(runtime: Runtime[AggregateContext]):
        """A guarded call outside the layers (USC's pick, the model's test inputs)."""

        async def call(request: GenerationRequest) -> Any:
            deadline = None
            if config.run_timeout_s is not None:
                deadline = clock.started(runtime.stream_writer) + config.run_timeout_s
            # Not retried by a node's RetryPolicy: this is its last attempt.
            return await guarded_generate(
                backend,
                request,
                timeout_s=config.call_timeout_s,
                deadline=deadline,
                attempt=config.max_retries,
                attempts=config.max_retries,
            )

        return call

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
            "asked": question,
            "layer": 0,
            "budget": budget,
            "population": [],
            "pending": Overwrite([]),
            "layers": Overwrite([]),
            "started": time.monotonic(),
            "retry": [],
            "wave": [],
            "early_choice": None,
            "notes": None,
            "test_calls": None,
            "extra_usage": [],
        }

    def start_layer0(state: _State) -> list[Send]:
        return wave_sends(state["asked"], list(range(policy.first_wave())))

    async def generate(task: _Task, runtime: Runtime[AggregateContext]) -> dict[str, Any]:
        layer, index = task["layer"], task["index"]
        ctx = runtime.context or AggregateContext()
        record: dict[str, Any] = {
            "layer": layer,
            "index": index,
            "sources": task["sources"],
            "truncated": 0,
        }
        deadline = None
        if config.run_timeout_s is not None:
            deadline = clock.started(runtime.stream_writer) + config.run_timeout_s
        try:
            request = build_request(task, ctx, record)
            completion = await guarded_generate(
                backend,
                request,
                timeout_s=config.call_timeout_s,
                deadline=deadline,
                attempt=runtime.execution_info.node_attempt,
                attempts=config.max_retries,
            )
        except CallFailure as failure:
            if "must_succeed" in task:
                stall = task["must_succeed"]
                raise layer_failed(stall, f"call {index}: {failure.cause}", failure) from failure
            return {"pending": [{**record, "error": failure.cause}]}
        return {"pending": [{**record, **policy.record(completion), "error": None}]}

    def build_request(
        task: _Task, ctx: AggregateContext, record: dict[str, Any]
    ) -> GenerationRequest:
        layer, index = task["layer"], task["index"]
        try:
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
                    record["truncated"] += cut != text
                    fitted.append(cut)
                if task.get("notes"):
                    fitted = [f"{t}\n\n[{n}]" for t, n in zip(fitted, task["notes"], strict=True)]
                messages = aggregation_messages(task["question"], fitted, template)
                sampling = config.aggregator.to_sampling(
                    derive_seed(config.seed, layer, index), logprobs=policy.logprobs
                )
                lora = ctx.aggregator_lora or config.aggregator_lora or ctx.lora
            return GenerationRequest(messages=tuple(messages), sampling=sampling, lora=lora)
        except Exception as exc:  # noqa: BLE001 - e.g. a custom backend's truncate
            raise CallFailure(f"{type(exc).__name__}: {exc}") from exc

    def layer_failed(stall: dict[str, Any], last: str, failure: CallFailure) -> LayerFailedError:
        call = last.split(":", 1)[0] + ":"
        causes = [f"{last} (on its last try)" if c.startswith(call) else c for c in stall["causes"]]
        hint = (
            "The finished layers and calls are in the checkpoint: fix the cause and resume with "
            "graph.ainvoke(None, config) on the same thread_id, which retries only the failed calls."
            if checkpointer is not None
            else "Pass a checkpointer to build_graph (and a thread_id) to make a run resumable."
        )
        unavailable = failure.unavailable and stall["all_unavailable"]
        error = LayerUnavailableError if unavailable else LayerFailedError
        return error(
            stall["layer"], stall["succeeded"], stall["calls"], stall["needed"], causes, hint
        )

    async def collect_layer(state: _State, runtime: Runtime[AggregateContext]) -> dict[str, Any]:
        layer = state["layer"]
        done = sorted(state.get("pending") or [], key=lambda r: r["index"])
        ok = [r for r in done if r["error"] is None]
        failed = [r for r in done if r["error"] is not None]
        failures = [f"call {r['index']}: {r['error']}" for r in failed]
        needed = min(config.min_survivors, len(done))
        if len(ok) < needed:
            # Not raised here: a failed barrier would be re-run on resume with the same failure
            # records and fail again without a single call. The failed calls are sent once more
            # instead, as calls that must succeed; they are what a resume re-runs.
            stall = {
                "layer": layer,
                "succeeded": len(ok),
                "calls": len(done),
                "needed": needed,
                "causes": failures,
                "all_unavailable": all("BackendUnavailableError" in r["error"] for r in failed),
            }
            return {
                "pending": Overwrite(ok),
                "retry": [{**r, "must_succeed": stall} for r in failed],
            }
        texts = [r["text"] for r in ok]
        answers = policy.answers(state["asked"], texts)
        saved, waves, probability = 0, [], None
        if layer == 0 and config.adaptive_width:
            more, probability = policy.next_wave(answers, len(done))
            if more:  # not sure yet: sample the next wave into the same layer
                return {"wave": list(range(len(done), len(done) + more)), "retry": []}
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
                test_calls, completion = await policy.test_inputs(
                    state["asked"], selector_call(runtime)
                )
                extra["test_calls"] = test_calls
                if completion is not None:
                    extra["extra_usage"] = [*state.get("extra_usage", []), _usage_of(completion)]
            checks = await policy.code_notes(state["asked"], texts, test_calls)
        event = LayerEvent(
            layer=layer,
            kind=layer_kind(layer),
            texts=texts,
            answers=answers,
            sources=[r["sources"] for r in ok],
            prompt_tokens=[r["prompt_tokens"] for r in ok],
            cached_prompt_tokens=[r.get("cached_prompt_tokens", 0) for r in ok],
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
            "retry": [],
        }

    def next_layer(state: _State) -> list[Send] | str:
        if state.get("retry"):
            layer = state["layer"]
            # Sources name texts of the previous layer; find them in the population (which
            # keep_confident may have thinned).
            ids = state.get("population_ids") or list(range(len(state["population"])))
            position = {source: j for j, source in enumerate(ids)}
            notes = state.get("notes")
            return [
                Send(
                    node_of(layer),
                    _Task(
                        question=state["asked"],
                        layer=layer,
                        index=r["index"],
                        sources=r["sources"],
                        texts=[state["population"][position[s]] for s in r["sources"]],
                        budget=state["budget"],
                        notes=None if notes is None else [notes[position[s]] for s in r["sources"]],
                        must_succeed=r["must_succeed"],
                    ),
                )
                for r in state["retry"]
            ]
        if state.get("wave"):
            return wave_sends(state["asked"], state["wave"])
        if state["layer"] > depth:
            return "finalize"
        return sends(
            state["asked"],
            state["layer"],
            state["population"],
            state["budget"],
            state.get("population_ids"),
            state.get("notes"),
        )

    async def finalize(state: _State, runtime: Runtime[AggregateContext]) -> dict[str, Any]:
        texts = state["population"]
        call = selector_call(runtime)
        test_calls = state.get("test_calls")
        extra_usage = list(state.get("extra_usage") or [])
        if config.resolved_select == "behaviour" and test_calls is None:
            test_calls, completion = await policy.test_inputs(state["asked"], call)
            if completion is not None:
                extra_usage.append(_usage_of(completion))
        selection = await policy.select(
            state["asked"],
            texts,
            policy.answers(state["asked"], texts),
            state.get("confidences") or None,
            call=call,
            reward_fn=reward_fn,
            test_calls=test_calls or (),
            early_choice=state.get("early_choice"),
        )
        choice = selection.index
        usage = Usage.from_layers([LayerEvent.model_validate(d) for d in state["layers"]])
        for u in [*extra_usage, *map(_usage_of, selection.calls)]:
            usage.add_call(u["prompt_tokens"], u["completion_tokens"], u.get("cached_prompt_tokens", 0))
        return {
            "answer": texts[choice],
            "usage": usage.model_dump(),
            "selection": {"index": choice, "rule": selection.rule, **selection.detail},
            "messages": [AIMessage(content=texts[choice], name=name)],
        }

    retry = RetryPolicy(
        max_attempts=config.max_retries,
        initial_interval=config.retry_backoff_s,
        # LangGraph's jitter adds up to 1 s: spreads real reconnects, would swamp short backoffs.
        jitter=config.retry_backoff_s >= 0.5,
        retry_on=BackendUnavailableError,
    )
    builder = StateGraph(
        _State, context_schema=AggregateContext, input_schema=InputState, output_schema=OutputState
    )
    builder.add_node("prepare", prepare)
    # Two nodes run the same call so that proposals and aggregations are told apart in the
    # mermaid drawing and in traces; both retry transient backend errors.
    builder.add_node("propose", generate, retry_policy=retry)
    builder.add_node("aggregate", generate, retry_policy=retry)
    builder.add_node("collect_layer", collect_layer)
    builder.add_node("finalize", finalize)
    builder.add_edge(START, "prepare")
    builder.add_conditional_edges("prepare", start_layer0, ["propose"])
    builder.add_edge("propose", "collect_layer")
    builder.add_edge("aggregate", "collect_layer")
    builder.add_conditional_edges("collect_layer", next_layer, ["aggregate", "finalize"])
    builder.add_edge("finalize", END)
    return builder.compile(checkpointer=checkpointer, name=name or "aft_graph")
