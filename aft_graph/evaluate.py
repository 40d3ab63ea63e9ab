"""Moved: the evaluation harness is the subpackage :mod:`aft_graph.eval` (this name still works).

``from aft_graph.evaluate import evaluate`` keeps working; new code imports from
``aft_graph.eval``.
"""

from .eval import *  # noqa: F403
from .eval import __all__  # noqa: F401
