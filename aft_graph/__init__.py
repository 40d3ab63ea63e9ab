"""aft-graph: propose-and-aggregate test-time scaling (AFT, RSA) as a LangGraph graph.

>>> from aft_graph import AggregateConfig, build_graph
>>> from aft_graph.backends import VLLMBackend
>>> graph = build_graph(VLLMBackend("default"), AggregateConfig(proposals=4, layers=2))
>>> result = await graph.ainvoke({"question": "..."})   # result["answer"], ["layers"], ["usage"]
"""

from .answers import extract_answer, majority_vote
from .calls import LayerFailedError, LayerUnavailableError
from .chat_model import AggregatingChatModel
from .config import AggregateConfig, SamplingConfig
from .events import EVENT_NAME, LayerEvent, Usage
from .graph import AggregateContext, build_graph
from .names import parse_model_name
from .prompts import PromptTemplate
from .tools import as_tool

__all__ = [
    "EVENT_NAME",
    "AggregateConfig",
    "AggregateContext",
    "AggregatingChatModel",
    "LayerEvent",
    "LayerFailedError",
    "LayerUnavailableError",
    "PromptTemplate",
    "SamplingConfig",
    "Usage",
    "as_tool",
    "build_graph",
    "extract_answer",
    "majority_vote",
    "parse_model_name",
]
__version__ = "0.1.0"
