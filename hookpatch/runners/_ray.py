"""Run a call's jobs on a Ray cluster: one actor per GPU (or per CPU worker), the model loaded once on each.

A sweep, edge patching or faithfulness call cuts its work into picklable jobs and hands them,
with its context, to an executor (:mod:`hookpatch.runners._executor`). :class:`RayExecutor`
ships the jobs to Ray actors instead of running them here. It never ships the model or the
cached runs: each actor loads the same model from the arguments ``load_model`` (or
``tiny_model``) recorded on it (:class:`~hookpatch.model.LoadSpec`), checks a sample of its
weights against the caller's model, and builds the call's context from the context's
*recipe* (the prompt set, the metric and what to cache: plain data), computing its own
cached runs. The results come back in the jobs' order and equal the in-process executor's
(bit for bit on CPU at the same thread count).

Scheduling, placement and fault tolerance are Ray's: actors restart when their process dies
(``max_restarts``) and Ray retries the task they were running (``max_task_retries``), on a new
node if the old one is gone; :class:`ray.util.ActorPool` hands each idle actor the next job.
A job that raises (bad input) fails the call with that same exception, raised once, after
the jobs already running have finished; no partial result is returned.

Example (a local cluster is started when none is running; ``address="auto"`` joins an
existing one, e.g. after ``ray start --head`` on one machine and ``ray start --address=...``
on the others)::

    with RayExecutor(workers=2) as ray_exec:
        res = patch_sweep(model, prompts, metric, "z", by=("layer", "pos", "head"), executor=ray_exec)
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from hookpatch.errors import HookpatchError
from hookpatch.model._loading import _OBJECT, LoadSpec, load_spec

__all__ = ["RayExecutor"]

_SAMPLES = 16  # weights sampled per parameter for the same-model check


def weight_sample(model: Any) -> dict[str, torch.Tensor]:
    """A few weights of every parameter (float32, on the CPU), at fixed strides: what a worker
    compares to be sure it loaded the caller's model (same checkpoint, processing and dtype)."""
    out = {}
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        out[name] = flat[sample_index(flat.numel()).to(flat.device)].float().cpu()
    return out


def sample_index(numel: int, k: int = _SAMPLES) -> torch.Tensor:
    """``min(k, numel)`` evenly spaced indices from 0 to ``numel - 1``, in integer arithmetic
    (a float32 linspace rounds past the end of a tensor with tens of millions of entries)."""
    k = min(k, numel)
    if k <= 1:
        return torch.zeros(k, dtype=torch.long)
    return torch.arange(k, dtype=torch.long) * (numel - 1) // (k - 1)


def _same_weights(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> str | None:
    """None when the samples agree (to float rounding: weight processing may run on another
    device), else the first parameter that differs."""
    if mine.keys() != theirs.keys():
        return f"parameter names differ ({len(mine)} vs {len(theirs)} parameters)"
    for name, value in theirs.items():
        if not torch.allclose(mine[name], value, rtol=1e-4, atol=1e-6):
            return f"{name} differs"
    return None


class _Worker:
    """A Ray actor's state: the model it loaded and the contexts it built, newest last."""

    def __init__(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self._model_key: str | None = None
        self._model: Any = None
        self._sample: dict[str, torch.Tensor] = {}
        self._checked: str | None = None  # digest of the last caller's sample found equal
        self._contexts: OrderedDict[str, Any] = OrderedDict()

    def pid(self) -> int:
        return os.getpid()

    def run(self, model: tuple[str, dict, dict, dict], recipe: tuple[str, list], index: int, job: Any) -> tuple:
        """``(index, True, job's result)``, or ``(index, False, the exception it raised)``."""
        try:
            context = self._context(model, recipe)
            return index, True, job.run(context)
        except Exception as err:  # returned, not raised: the caller re-raises it once, as it is
            return index, False, _picklable(err)

    def _context(self, model: tuple[str, dict, dict, dict], recipe: tuple[str, list]) -> Any:
        import ray
        from ray import cloudpickle

        model_key, spec, overrides, sample = model
        if model_key != self._model_key:
            self._model, self._model_key, self._checked = None, None, None
            self._contexts.clear()
            if overrides.get("device") == "auto":  # the GPU Ray gave this actor, if any
                overrides = {**overrides, "device": "cuda" if ray.get_gpu_ids() else "cpu"}
            self._model = LoadSpec.from_dict(spec).load(**overrides)
            self._sample = weight_sample(self._model)
            self._model_key = model_key
        digest = _digest(sample)
        if digest != self._checked:  # the caller's weights, checked once per version
            differs = _same_weights(self._sample, sample)
            if differs is not None:
                raise HookpatchError(
                    f"executor=RayExecutor: the model a worker loaded from {spec['name']!r} is not the caller's "
                    f"model ({differs}). Were its weights changed after loading? A worker can only load a model "
                    "from its load arguments; run this call in process (leave executor= unset)."
                )
            self._checked = digest
        recipe_key, (blob,) = recipe
        if recipe_key not in self._contexts:
            self._contexts[recipe_key] = cloudpickle.loads(ray.get(blob)).build(self._model)
            while len(self._contexts) > 2:
                self._contexts.popitem(last=False)
        self._contexts.move_to_end(recipe_key)
        return self._contexts[recipe_key]


def _digest(sample: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for name, value in sample.items():
        h.update(name.encode())
        h.update(value.numpy().tobytes())
    return h.hexdigest()


def _picklable(err: Exception) -> Exception:
    """``err`` if it pickles, else a HookpatchError with its text."""
    from ray import cloudpickle

    try:
        cloudpickle.loads(cloudpickle.dumps(err))
        return err
    except Exception:
        return HookpatchError(f"{type(err).__name__}: {err}")


class RayExecutor:
    """Runs a call's jobs on Ray actors, each holding its own copy of the model.

    Pass it as ``executor=`` to :func:`~hookpatch.patch_sweep`, :func:`~hookpatch.ablation_sweep`,
    :func:`~hookpatch.attribution.compare`, :func:`~hookpatch.circuits.edge_patch`,
    :func:`~hookpatch.circuits.path_patch_sweep`, the faithfulness functions,
    :func:`~hookpatch.circuits.compare_edges`, and to the integrated-gradients forms of
    :func:`~hookpatch.attribution.attribution_sweep` (``steps > 1``: a job per site) and
    :func:`~hookpatch.circuits.edge_attribution` (``method="eap-ig"``, ``steps_per_job=1``). The actors
    start on the first call and are kept (with their model) for the next; :meth:`shutdown`
    (or leaving a ``with`` block) stops them.

    Args:
        workers: how many actors; default one per GPU of the cluster, or one per
            ``cpus_per_worker`` CPUs when it has none.
        address: the cluster to join (``"auto"``: the running one); None starts a local
            cluster when Ray is not initialised yet (``init_kwargs`` go to ``ray.init``).
        cpus_per_worker: CPUs reserved per actor; also its torch thread count unless
            ``threads_per_worker`` says otherwise.
        gpus_per_worker: GPUs per actor (default 1 when the cluster has GPUs, else 0); an actor
            with a GPU loads the model on it.
        max_retries: how often a job is retried when its worker process dies (the actor is
            restarted each time, loading the model again).
        init_kwargs: extra arguments for ``ray.init`` when this executor starts Ray.

    Example:
        >>> with RayExecutor(workers=2) as ex:
        ...     res = patch_sweep(model, prompts, metric, "z", by=("layer", "pos", "head"), executor=ex)
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        address: str | None = None,
        cpus_per_worker: int = 1,
        gpus_per_worker: int | float | None = None,
        threads_per_worker: int | None = None,
        max_retries: int = 3,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        for name, value, least in (("workers", workers, 1), ("cpus_per_worker", cpus_per_worker, 1),
                                   ("threads_per_worker", threads_per_worker, 1), ("max_retries", max_retries, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise HookpatchError(f"{name}={value!r}: expected an int >= {least}.")
        if gpus_per_worker is not None and (isinstance(gpus_per_worker, bool) or not gpus_per_worker >= 0):
            raise HookpatchError(f"gpus_per_worker={gpus_per_worker!r}: expected a number >= 0 (None: 1 per GPU).")
        self.workers = workers
        self.address = address
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.threads_per_worker = threads_per_worker or cpus_per_worker
        self.max_retries = max_retries
        self.init_kwargs = dict(init_kwargs or {})
        self._actors: list[Any] = []
        self._started_ray = False

    def __repr__(self) -> str:
        return (f"RayExecutor(workers={self.workers}, address={self.address!r}, "
                f"cpus_per_worker={self.cpus_per_worker}, gpus_per_worker={self.gpus_per_worker})")

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __getstate__(self) -> dict[str, Any]:  # the actors stay with the process that started them
        return {**self.__dict__, "_actors": [], "_started_ray": False}

    # ----------------------------------------------------------------------------------------
    def run(self, jobs: Sequence[Any], context: Any, *, progress: bool = True, desc: str = "jobs") -> list[Any]:
        """Each job's result, in the jobs' order, computed on the actors."""
        jobs = list(jobs)
        if not jobs:
            return []
        model_arg, recipe = self._shipping(context)  # checked before anything starts
        ray = _ray()
        from ray import cloudpickle
        from ray.exceptions import RayActorError
        from ray.util import ActorPool

        blob = cloudpickle.dumps(recipe)
        recipe_arg = (hashlib.sha1(blob).hexdigest(), [ray.put(blob)])  # in a list: fetched only when needed
        pool = ActorPool(self._start())
        results: list[Any] = [None] * len(jobs)
        todo = iter(range(len(jobs)))
        error: BaseException | None = None
        bar = tqdm(total=len(jobs), desc=desc, disable=not progress, leave=False)
        try:
            while True:
                while error is None and pool.has_free():
                    i = next(todo, None)
                    if i is None:
                        break
                    pool.submit(lambda actor, i: actor.run.remote(model_arg, recipe_arg, i, jobs[i]), i)
                if not pool.has_next():
                    break
                try:
                    i, ok, value = pool.get_next_unordered()
                except RayActorError as err:
                    self.shutdown(stop_ray=False)  # a worker died more than max_retries times: start anew next call
                    error = error or HookpatchError(
                        f"a Ray worker died {self.max_retries + 1} times running this call's jobs; the call was "
                        f"stopped. Check the workers' memory (a smaller memory_budget= gives smaller jobs) or "
                        f"raise max_retries=. Ray said: {err}"
                    )
                    continue
                if ok:
                    results[i] = value
                    bar.update(1)
                elif error is None:
                    error = value
        finally:
            bar.close()
        if error is not None:
            raise error
        return results

    def shutdown(self, stop_ray: bool = True) -> None:
        """Stop the actors (and Ray, if this executor started it)."""
        if self._actors:
            ray = _ray()
            for actor in self._actors:
                try:
                    ray.kill(actor)
                except Exception:  # already gone
                    pass
        self._actors = []
        if stop_ray and self._started_ray:
            _ray().shutdown()
            self._started_ray = False

    def worker_pids(self) -> list[int]:
        """The process id of each actor (started if need be): to watch or stop them."""
        ray = _ray()
        return [int(pid) for pid in ray.get([actor.pid.remote() for actor in self._start()])]

    # ----------------------------------------------------------------------------------------
    def _shipping(self, context: Any) -> tuple[tuple[str, dict, dict, dict], Any]:
        """What the actors need, checked before anything starts: how to load the model (its
        load arguments, the device overrides, a weight sample) and how to build the context."""
        recipe = getattr(context, "recipe", None)
        if recipe is None or not callable(getattr(recipe, "build", None)):
            raise HookpatchError(
                f"executor=RayExecutor: this call's context ({type(context).__name__}) has no recipe a worker "
                "could build it from; run it in process (leave executor= unset)."
            )
        model = context.model
        spec = load_spec(model)
        if spec is None:
            raise HookpatchError(
                "executor=RayExecutor needs a model from hookpatch.load_model or tiny_model: each worker loads "
                "the same model from the arguments they record, and this model has none. Load it with "
                "load_model(...), or leave executor= unset to run in process."
            )
        objects = [k for k, v in spec.options if isinstance(v, dict) and _OBJECT in v]
        if objects:
            raise HookpatchError(
                f"executor=RayExecutor: this model was loaded with {objects[0]}= an object a worker cannot load "
                f"again; load it by name or directory only, or leave executor= unset to run in process."
            )
        # a model placed by device_map or n_devices keeps its placement; else each actor uses its GPU or the CPU
        placed = spec.option("device_map") is not None or (spec.option("n_devices") or 1) > 1
        overrides: dict[str, Any] = {} if placed else {"device": "auto"}
        data = spec.to_dict()
        key = hashlib.sha1(repr((data, overrides)).encode()).hexdigest()
        return (key, data, overrides, weight_sample(model)), recipe

    def _start(self) -> list[Any]:
        """The actors, started if need be (Ray too, when nothing has started it)."""
        if self._actors:
            return self._actors
        ray = _ray()
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, **self.init_kwargs}
            ray.init(address=self.address, **kwargs)
            self._started_ray = True
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        per_gpu = self.gpus_per_worker if self.gpus_per_worker is not None else (1.0 if gpus else 0.0)
        workers = self.workers or max(1, int(gpus // per_gpu) if per_gpu else int(cpus // self.cpus_per_worker))
        if workers * self.cpus_per_worker > cpus or workers * per_gpu > gpus:
            raise HookpatchError(
                f"workers={workers} with cpus_per_worker={self.cpus_per_worker}, gpus_per_worker={per_gpu} needs "
                f"{workers * self.cpus_per_worker} CPUs and {workers * per_gpu} GPUs; the Ray cluster has {cpus:g} "
                f"CPUs and {gpus:g} GPUs. Ask for fewer workers (or add nodes to the cluster)."
            )
        actor = ray.remote(_Worker).options(
            num_cpus=self.cpus_per_worker, num_gpus=per_gpu,
            max_restarts=self.max_retries, max_task_retries=self.max_retries,
        )
        self._actors = [actor.remote(self.threads_per_worker) for _ in range(workers)]
        return self._actors


def _ray() -> Any:
    """The ``ray`` module, or a clear error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise HookpatchError(
            "executor=RayExecutor needs Ray: pip install 'hookpatch[ray]' (or pip install 'ray>=2.9')."
        ) from None
    return ray
