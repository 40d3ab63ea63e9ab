"""``AggregatingChatModel``: the propose-and-aggregate graph behind a langchain-core chat model.

Anything that takes a chat model (a LangChain chain, a LangGraph node, an agent's final answer
step) can use propose-and-aggregate in its place::

    from aft_graph.chat_model import AggregatingChatModel
    model = AggregatingChatModel.from_strategy("aft-k4-l2", backend)   # or a server URL
    reply = await model.ainvoke("What is 17 * 23? Put the answer in \\boxed{}.")

- The question is the last human message; a system message becomes the proposals' system prompt;
  earlier turns are written into the question as context (see :func:`conversation_question`).
- Each finished layer reaches the run's callback handlers as the custom event ``aft_layer``
  (``on_custom_event``; ``astream_events(version="v2")`` yields ``on_custom_event``).
- The reply's ``usage_metadata`` counts the tokens of every call (proposals and aggregations);
  ``response_metadata["aft"]`` holds the run's usage by role and its layers.
- ``astream`` yields the final answer as one chunk (the graph answers once its last layer is done:
  there is no ``_astream``, so LangChain falls back to ``ainvoke``, which keeps the callback tree
  intact); watch the layers through callbacks.

**Tool calling is not supported**: the aggregated answer is free text, and no aggregation rule for
tool calls is defined (K proposals that call different tools cannot be merged meaningfully).
:meth:`AggregatingChatModel.bind_tools` (and so ``with_structured_output``) raises
``NotImplementedError`` naming the alternative: give a tool-calling model to the agent and
propose-and-aggregate to it as a tool (:func:`aft_graph.as_tool`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr

from .config import AggregateConfig
from .graph import AggregateContext, build_graph
from .names import parse_model_name

__all__ = ["AggregatingChatModel", "conversation_question"]

_ROLE_NAMES = {"human": "User", "ai": "Assistant", "tool": "Tool result", "function": "Tool result"}


def conversation_question(messages: Sequence[BaseMessage]) -> tuple[str, str | None]:
    """The question (and system prompt) the graph answers for a chat conversation.

    The last message must be a human message: it is the question. System messages are joined
    into the proposals' system prompt. Earlier turns are prepended as a transcript, so a follow-up
    question ("and what if it were 30?") keeps its context.

    Returns:
        ``(question, system)``; ``system`` is ``None`` without system messages.

    Raises:
        ValueError: no messages, the last one is not from the user, or its text is empty.
    """
    system = [m.text for m in messages if m.type == "system" and m.text.strip()]
    turns = [m for m in messages if m.type != "system"]
    if not turns or turns[-1].type != "human":
        raise ValueError(
            "the last message must be the user's question (a human/'user' message): "
            "propose-and-aggregate answers one question"
        )
    question = turns[-1].text.strip()
    if not question:
        raise ValueError("the last user message has no text: put the question in it")
    if len(turns) > 1:
        lines = []
        for m in turns[:-1]:
            text = m.text.strip()
            calls = getattr(m, "tool_calls", None) or []
            text += "".join(f"\n[called tool {c['name']} with {c['args']}]" for c in calls)
            lines.append(f"{_ROLE_NAMES.get(m.type, m.type.capitalize())}: {text}")
        question = (
            "Earlier in this conversation:\n\n" + "\n\n".join(lines)
            + f"\n\nAnswer the user's latest message:\n\n{question}"
        )  # fmt: skip
    return question, ("\n\n".join(system) if system else None)


def _child_callbacks(run_manager: Any) -> AsyncCallbackManager | None:
    """Callbacks for the graph run, nested under this chat model's run.

    An LLM run manager has no ``get_child`` (LLM runs are leaves in LangChain's tree); the graph
    is a real child here, so its handlers (and the ``aft_layer`` events) are passed down the same
    way a chain's ``get_child`` would.
    """
    if run_manager is None:
        return None
    return AsyncCallbackManager(
        handlers=list(run_manager.inheritable_handlers),
        inheritable_handlers=list(run_manager.inheritable_handlers),
        parent_run_id=run_manager.run_id,
        tags=list(run_manager.inheritable_tags),
        inheritable_tags=list(run_manager.inheritable_tags),
        metadata=dict(run_manager.inheritable_metadata),
        inheritable_metadata=dict(run_manager.inheritable_metadata),
    )


class AggregatingChatModel(BaseChatModel):
    """A chat model whose every reply is a propose-and-aggregate run.

    Args:
        backend: Where the generations go (any :class:`~aft_graph.backends.Backend`).
        config: Strategy and sizes (default: AFT, K=4, L=1).
        context: Per-run context, e.g. ``AggregateContext(aggregator_lora="adapter")``.

    Construct it from a strategy name with :meth:`from_strategy`. Tool binding raises
    ``NotImplementedError`` (see the module docstring).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    backend: Any = Field(exclude=True)
    config: AggregateConfig = Field(default_factory=AggregateConfig)
    context: AggregateContext | None = None

    _graph: Any = PrivateAttr(default=None)

    @classmethod
    def from_strategy(
        cls, strategy: str, backend: Any, *, context: AggregateContext | None = None, **overrides: Any
    ) -> AggregatingChatModel:
        """Build one from a strategy name (``"aft-k4-l2"``, ``"rsa-n8-k4-t3"``, ``"sc-k8"``...).

        Args:
            strategy: A name of :mod:`aft_graph.names`.
            backend: A backend, or the ``/v1`` URL (str) of an OpenAI-compatible server such as
                ``vllm serve``, reached with :class:`~aft_graph.backends.OpenAIBackend`.
            context: Per-run context (LoRA adapters).
            **overrides: Other ``AggregateConfig`` fields (``seed``, ``proposer``, ...).
        """
        if isinstance(backend, str):
            from .backends import OpenAIBackend

            backend = OpenAIBackend(backend)
        return cls(backend=backend, config=parse_model_name(strategy, **overrides), context=context)

    @property
    def _llm_type(self) -> str:
        return "aft-graph"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"config": self.config.model_dump(mode="json", exclude_none=True)}

    @property
    def graph(self):
        """The compiled graph every call runs (built once)."""
        if self._graph is None:
            self._graph = build_graph(self.backend, self.config, name="aggregating_chat_model")
        return self._graph

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any):
        raise NotImplementedError(
            "AggregatingChatModel does not call tools: the aggregated reply is free text and K "
            "proposals that call different tools cannot be merged. Give the agent a tool-calling "
            "chat model (e.g. ChatOpenAI on `vllm serve --enable-auto-tool-choice`) and "
            "propose-and-aggregate as one of its tools: aft_graph.as_tool(build_graph(...))"
        )

    async def _run(self, messages: list[BaseMessage], stop: list[str] | None, callbacks) -> AIMessage:
        question, system = conversation_question(messages)
        graph = self.graph
        if system is not None or stop:
            graph = self._graph_for(system, stop)
        result = await graph.ainvoke(
            {"question": question}, config={"callbacks": callbacks}, context=self.context
        )
        usage = result["usage"]
        return AIMessage(
            content=result["answer"],
            usage_metadata={
                "input_tokens": usage["prompt_tokens"],
                "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
            },
            response_metadata={
                "model_name": self._llm_type,
                "aft": {"usage": usage, "layers": result["layers"]},
            },
        )

    def _graph_for(self, system: str | None, stop: list[str] | None):
        """A graph for a call with its own system prompt or stop strings (not cached: rare)."""
        update: dict[str, Any] = {}
        if system is not None:
            update["proposal_system"] = system
        if stop:
            for role in ("proposer", "aggregator"):
                sampling = getattr(self.config, role)
                update[role] = sampling.model_validate(
                    {**sampling.model_dump(), "stop": tuple(sampling.stop) + tuple(stop)}
                )
        config = AggregateConfig.model_validate({**self.config.model_dump(), **update})
        return build_graph(self.backend, config, name="aggregating_chat_model")

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        callbacks = _child_callbacks(run_manager)
        message = await self._run(messages, stop, callbacks)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # The graph is async; a sync call runs it on a fresh event loop. Backends bound to the
        # caller's loop (an in-process VLLMBackend started inside async code) need ainvoke.
        callbacks = _child_callbacks(run_manager)

        def run() -> AIMessage:
            return asyncio.run(self._run(messages, stop, callbacks))

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            message = run()
        else:  # called synchronously from inside a running loop: do not block that loop's thread
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                message = pool.submit(run).result()
        return ChatResult(generations=[ChatGeneration(message=message)])
