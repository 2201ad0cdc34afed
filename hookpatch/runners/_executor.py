"""Executors: who runs a sweep's jobs, and where.

A sweep is cut into small picklable jobs (frozen dataclasses holding plain data: which cells,
which run, which source — never the model, a cache or a closure), each with a
``run(context)`` method. The context is what a worker owns: the model, its runner, the cached
unpatched runs and the metric. An executor takes the jobs and a context and returns each
job's result, in the jobs' order, whatever order it ran them in.

:class:`InProcessExecutor` (the default) runs them one after another in this process, with a
progress bar over jobs. :class:`~hookpatch.runners.RayExecutor` ships the jobs to Ray actors
that rebuild the context from the model's load arguments and the context's ``recipe`` (plain
data: prompts, metric, what to cache) and run the very same jobs; no algorithm knows where it
runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from tqdm.auto import tqdm

from hookpatch.errors import HookpatchError

C = TypeVar("C", contravariant=True)
R = TypeVar("R", covariant=True)


@runtime_checkable
class Job(Protocol[C, R]):
    """A picklable unit of work: ``run(context)`` computes its result from the context alone."""

    def run(self, context: C) -> R: ...


@runtime_checkable
class Executor(Protocol):
    """Runs jobs against a context and returns their results in the jobs' order."""

    def run(self, jobs: Sequence[Any], context: Any, *, progress: bool = True, desc: str = "jobs") -> list[Any]: ...


class InProcessExecutor:
    """Runs jobs one after another in this process, with a tqdm bar over jobs.

    Example:
        >>> res = patch_sweep(model, prompts, metric, "z", executor=InProcessExecutor())
    """

    def run(self, jobs: Sequence[Any], context: Any, *, progress: bool = True, desc: str = "jobs") -> list[Any]:
        out = []
        bar = tqdm(total=len(jobs), desc=desc, disable=not progress, leave=False)
        try:
            for job in jobs:
                out.append(job.run(context))
                bar.update(1)
        finally:
            bar.close()
        return out


def require_executor(executor: Any, arg: str = "executor") -> Any:
    """``executor`` (None: a new :class:`InProcessExecutor`), checked to have ``run``."""
    if executor is None:
        return InProcessExecutor()
    if isinstance(executor, type) or not callable(getattr(executor, "run", None)):
        what = f"the class {executor.__name__}" if isinstance(executor, type) else type(executor).__name__
        raise HookpatchError(
            f"{arg}= must be an executor instance with a run(jobs, context, progress=, desc=) method, "
            f"e.g. InProcessExecutor(); got {what}. Leave it unset to run in this process."
        )
    return executor
