"""Where per-layer work runs: in this process (``local``) or as Ray tasks (``ray``), on this machine's
cores or on a cluster.

The unit of work is one layer's job: a module-level function and its arguments (the layer's W, H and
settings) giving that layer's result (a solved layer, a database record, rebuilt weights). Jobs are
independent given their H, so they fan out; the calibration that produces H stays with the caller.
An executor only runs jobs and hands the results back, in the order they finish, to the caller,
which is the one writer of the model, the artifact or the database files: workers never write to
disk, so a cluster needs no shared filesystem, and a killed driver leaves only whole files behind.

``ray``: each job is a Ray task that declares the CPUs (and GPUs) it uses (one, or more for a job
expected to take more than its share of the cluster), its tensors travel
through Ray's object store, and a task whose worker process dies is retried (``max_retries``);
errors a job raises (a ``ValueError`` naming the layer) are not retried but re-raised here.
``address=None`` starts a local Ray on this machine's cores (its workers at the driver's priority,
not Ray's default of 15 niceness levels lower), unless Ray is already running in this process; an address (``HEAD:6379``, or ``auto``) joins a running cluster, started beforehand with
``ray start --head`` on one machine and ``ray start --address=HEAD:6379`` on the others (each with
obcompress installed in the same Python environment). The exact solvers give the same bits
at any torch thread count (they factor H on one thread), hence on either executor; GPTQ and
SparseGPT factor on the task's threads, so theirs hold per thread count.

Never a scheduler of our own: Ray places the tasks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .solvers import progress as solver_progress

__all__ = ["EXECUTORS", "Executor", "LayerJob", "LocalExecutor", "RayExecutor", "RAY_HINT", "make_executor"]

EXECUTORS = ("local", "ray")
RAY_HINT = "pip install 'obcompress[ray]' (or: pip install ray)"


@dataclass
class LayerJob:
    """One layer's work: ``fn(*args)``. ``fn`` must be a module-level function (Ray ships it by
    name); the tensors among ``args`` go through the object store. An executor drops ``args`` once
    the job has run here (or has been handed to Ray), so that Hessians are freed as the work goes."""

    name: str
    fn: Callable[..., Any]
    args: Tuple[Any, ...] = ()
    cpus: float = 1.0
    gpus: float = 0.0
    estimate: float = 0.0  # expected seconds: Ray starts the longest jobs first (the critical path)
    # Local executor only: called with (rows done, rows total) while an exact solver runs.
    progress: Optional[Callable[[int, int], None]] = None


class Executor:
    """Runs layer jobs; ``run`` yields ``(index, result)`` as jobs finish, ``map`` returns results in order."""

    kind = "local"

    def run(self, jobs: Sequence[LayerJob]) -> Iterator[Tuple[int, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def map(self, jobs: Sequence[LayerJob]) -> List[Any]:
        out: List[Any] = [None] * len(jobs)
        for i, result in self.run(jobs):
            out[i] = result
        return out

    def describe(self) -> str:
        return self.kind


class LocalExecutor(Executor):
    """The jobs one after the other in this process (each solver uses this process's threads)."""

    kind = "local"

    def run(self, jobs: Sequence[LayerJob]) -> Iterator[Tuple[int, Any]]:
        for i, job in enumerate(jobs):
            args, job.args = job.args, ()
            if job.progress is not None:
                with solver_progress.listen(job.progress):
                    result = job.fn(*args)
            else:
                result = job.fn(*args)
            del args
            yield i, result


def _run_job(fn: Callable[..., Any], threads: float, *args: Any) -> Any:
    """A job inside a Ray worker: as many torch threads as the task declared CPUs."""
    torch.set_num_threads(max(1, int(threads)))
    return fn(*args)


def _require_ray():
    try:
        import ray
    except ImportError as e:
        raise ValueError(f"executor 'ray' needs Ray, which is not installed here ({e}): {RAY_HINT}") from None
    return ray


class RayExecutor(Executor):
    """Each job a Ray task (``num_cpus`` = the job's CPUs, ``num_gpus`` its GPUs)."""

    kind = "ray"

    def __init__(self, address: Optional[str] = None, *, max_retries: int = 3, **init_kwargs: Any):
        ray = _require_ray()
        self.address = address
        self.max_retries = int(max_retries)
        if not ray.is_initialized():
            if address is None:
                # Ray starts its workers 15 niceness levels below the driver by default; the workers
                # do the compute here, and on a shared machine they would starve.
                os.environ.setdefault("RAY_worker_niceness", "0")
            try:
                ray.init(address=address, include_dashboard=False, **init_kwargs)
            except (ConnectionError, RuntimeError) as e:
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise ValueError(f"cannot start or join {where}: {e}. Start a cluster with `ray start --head` "
                                 "(and `ray start --address=HEAD:6379` on the other machines), or run without "
                                 "--ray-address for a local Ray") from None
        self._ray = ray
        self._remote = ray.remote(_run_job)

    def describe(self) -> str:
        res = self._ray.cluster_resources()
        nodes = len([n for n in self._ray.nodes() if n.get("Alive")])
        return f"ray ({nodes} node{'s' if nodes != 1 else ''}, {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs)"

    def _cpus(self, jobs: Sequence[LayerJob]) -> List[float]:
        """CPUs each job asks for: its own, or for a job expected to take more than its fair share of
        the cluster (the estimated total over the CPUs), that many shares, up to one node's CPUs — so
        that one large layer does not run single-threaded while the rest of the cluster waits for it."""
        total = sum(j.estimate for j in jobs)
        nodes = [n.get("Resources", {}).get("CPU", 0) for n in self._ray.nodes() if n.get("Alive")]
        cluster, node = sum(nodes), max(nodes, default=1)
        out = []
        for j in jobs:
            cpus = j.cpus
            if total > 0 and cluster > 1 and j.gpus == 0 and j.estimate > total / cluster:
                cpus = max(cpus, float(min(node, -(-j.estimate // (total / cluster)))))
            out.append(cpus)
        return out

    def run(self, jobs: Sequence[LayerJob]) -> Iterator[Tuple[int, Any]]:
        ray = self._ray
        pending: Dict[Any, int] = {}
        cpus = self._cpus(jobs)
        try:
            for i in sorted(range(len(jobs)), key=lambda k: -jobs[k].estimate):
                job = jobs[i]
                args = [ray.put(a) if isinstance(a, torch.Tensor) else a for a in job.args]
                job.args = ()
                ref = self._remote.options(
                    num_cpus=cpus[i], num_gpus=job.gpus, max_retries=self.max_retries, retry_exceptions=False,
                    name=f"obcompress {job.fn.__name__} {job.name}",
                ).remote(job.fn, cpus[i], *args)
                pending[ref] = i
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    yield i, self._get(ref, jobs[i])
        finally:
            for ref in pending:  # an error, or the caller stopped early
                ray.cancel(ref, force=True)

    def _get(self, ref, job: LayerJob) -> Any:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, ValueError):
                raise ValueError(str(cause)) from None
            raise
        except ray.exceptions.WorkerCrashedError as e:
            raise RuntimeError(f"layer {job.name}: its Ray worker died {self.max_retries + 1} times ({e})") from None


def make_executor(kind: Union[None, str, Executor] = None, address: Optional[str] = None) -> Executor:
    """``"local"`` (the default) or ``"ray"`` (``address``: join that cluster); an Executor is returned as is."""
    if isinstance(kind, Executor):
        return kind
    kind = kind or "local"
    if kind not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if kind == "local":
        if address:
            raise ValueError("a Ray address was given but the executor is local: add --executor ray (executor: ray)")
        return LocalExecutor()
    return RayExecutor(address)


class EtaLine:
    """The (rows done, rows total) listener of a long solve: calls ``show(text)`` with the rows done and
    an ETA at most every ``every`` seconds."""

    def __init__(self, show: Callable[[str], None], every: float = 1.0):
        self.show = show
        self.every = every
        self.start: Optional[float] = None
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.start is None or done <= 0:
            self.start = now
            return
        if now - self.last < self.every and done < total:
            return
        self.last = now
        rate = (now - self.start) / done
        self.show(f"rows {done}/{total}, ETA {format_seconds(rate * (total - done))}")


def format_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s // 60:.0f} min {s % 60:02.0f} s"
    return f"{s // 3600:.0f} h {(s % 3600) // 60:02.0f} min"
