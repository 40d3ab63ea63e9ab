"""Shared plumbing: bounded concurrent generation with retries and a rich progress bar."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from aft_graph.backends.base import BackendError, BackendUnavailableError

T = TypeVar("T")
U = TypeVar("U")

__all__ = ["bounded_map", "console", "progress", "progress_bar"]


def console():
    from rich.console import Console

    return Console(stderr=True)


def progress_bar(label: str):
    """A rich ``Progress`` on stderr: ``label`` (markup, may use ``{task.description}``), bar,
    done/total, elapsed and remaining time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console(),
    )


@contextmanager
def progress(description: str, total: int | None, *, enabled: bool = True):
    """A rich progress bar (on stderr); yields ``advance(n=1)``."""
    if not enabled:
        yield lambda n=1: None
        return
    with progress_bar("[bold]{task.description}") as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


async def _with_retries(fn: Callable[[], Awaitable[U]], attempts: int) -> U:
    delay = 1.0
    for attempt in range(attempts):
        try:
            return await fn()
        except BackendUnavailableError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


async def bounded_map(
    items: Sequence[T],
    fn: Callable[[T], Awaitable[U]],
    *,
    concurrency: int,
    attempts: int = 3,
) -> AsyncIterator[tuple[T, U | None, BaseException | None]]:
    """Run ``fn`` over ``items`` with at most ``concurrency`` in flight; yield as each finishes.

    Yields ``(item, result, None)`` or ``(item, None, error)`` for a request the backend rejected
    (:class:`BackendError`: counted and skipped by the caller). A backend that stays unreachable
    (:class:`BackendUnavailableError` after ``attempts`` tries) ends the job with that error: what
    was written so far is kept and the next run resumes.
    """
    sem = asyncio.Semaphore(concurrency)

    async def one(item: T) -> tuple[T, Any, BaseException | None]:
        async with sem:
            try:
                return item, await _with_retries(lambda: fn(item), attempts), None
            except BackendUnavailableError:
                raise
            except (BackendError, ValueError) as exc:
                return item, None, exc

    tasks = [asyncio.create_task(one(item)) for item in items]
    try:
        for fut in asyncio.as_completed(tasks):
            yield await fut
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
