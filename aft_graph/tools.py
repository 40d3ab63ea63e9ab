"""The graph as a LangChain tool, so an agent can call propose-and-aggregate as a reasoning step."""

from __future__ import annotations

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import StructuredTool
from langgraph.graph.state import CompiledStateGraph
from pydantic import BaseModel, Field

__all__ = ["as_tool"]


class _ToolInput(BaseModel):
    question: str = Field(description="The full question or task to solve, self-contained.")


def as_tool(
    graph: CompiledStateGraph,
    *,
    name: str = "propose_and_aggregate",
    description: str = (
        "Solve a hard question carefully: samples several independent answers and aggregates them "
        "into one refined answer. Give the complete question."
    ),
) -> StructuredTool:
    """Wrap a graph from :func:`~aft_graph.build_graph` as a tool that returns the final answer.

    The run config (callbacks, tags) flows into the graph, so layer events still reach the
    agent's callback handlers as ``aft_layer`` custom events.
    """

    async def _run(question: str, config: RunnableConfig) -> str:
        result = await graph.ainvoke({"question": question}, config=config)
        return result["answer"]

    return StructuredTool.from_function(
        coroutine=_run, name=name, description=description, args_schema=_ToolInput
    )
