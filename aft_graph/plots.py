"""Moved: the plots are :mod:`aft_graph.eval.plots` (this name still works)."""

from .eval.plots import *  # noqa: F403
from .eval.plots import __all__  # noqa: F401
