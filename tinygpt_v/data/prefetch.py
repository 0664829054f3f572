"""Loading batches ahead of the training step, in worker processes, without losing exactness.

Two independent pieces, both used by `MixedLoader`:

* `SampleWorkers`: `num_workers` forked processes that turn load tasks into samples (read the
  image file, decode, resize, normalise) outside the main process's GIL. A task is the
  (index, rng) or (raw tar member, rng) that the loader's sources hand out; the worker runs
  the same `source.load(task)` the main process would, so the samples are identical whatever
  the number of workers. A `SkipSample` comes back as a plain tuple and is counted in the main
  process, as before.
* `Prefetcher`: a background thread that calls the loader's own `next_batch()` up to `depth`
  batches ahead and queues each batch with a snapshot of the loader's state *after* it. The
  consumer's `state_dict()` is the snapshot of the last batch it took, so a checkpoint never
  counts batches that were prepared but not trained on: a resume replays exactly those.

Images are pinned in the background thread (when CUDA is present) and the consumer copies them
with `non_blocking=True`, so the host-to-device copy overlaps the step already queued on the GPU.
"""
from __future__ import annotations

import multiprocessing
import queue
import threading
from collections.abc import Callable, Mapping

import torch
import torch.multiprocessing  # noqa: F401  (tensors cross process boundaries through shared memory)

from .images import SkipSample

_WORKER_SOURCES: Mapping | None = None  # set in each forked worker by _init_worker


def _init_worker(sources: Mapping) -> None:
    global _WORKER_SOURCES
    _WORKER_SOURCES = sources
    torch.set_num_threads(1)  # N workers x M intra-op threads would oversubscribe the cores


def _load_in_worker(job: tuple):
    name, task = job
    try:
        return _WORKER_SOURCES[name].load(task)
    except SkipSample as skip:  # exceptions with custom __init__ do not unpickle: send the fields
        return ("__skip__", skip.reason, skip.detail)


class SampleWorkers:
    """A pool of forked processes loading samples; see the module docstring.

    Fork (not spawn): the datasets (annotation records in memory) are inherited, not pickled.
    The pool is made when the loader is built, before the model or CUDA exist."""

    def __init__(self, sources: Mapping, num_workers: int):
        context = multiprocessing.get_context("fork")
        self.num_workers = num_workers
        self.pool = context.Pool(num_workers, initializer=_init_worker, initargs=(sources,))

    def load_all(self, name: str, tasks: list) -> list:
        """Samples (or SkipSample) for `tasks`, in order."""
        chunk = max(1, len(tasks) // (4 * self.num_workers))
        results = self.pool.map(_load_in_worker, [(name, task) for task in tasks], chunksize=chunk)
        return [SkipSample(r[1], r[2]) if isinstance(r, tuple) and r and r[0] == "__skip__" else r for r in results]

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


class Prefetcher:
    """Runs `produce() -> (batch, state_after)` in a thread, up to `depth` results ahead.

    An exception in `produce` is handed to the consumer at the position where it happened
    (the batches before it are still delivered), so a broken dataset stops the run at the same
    step as without prefetching."""

    def __init__(self, produce: Callable[[], tuple], depth: int, pin_memory: bool = False):
        self.produce, self.pin_memory = produce, pin_memory
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch, state = self.produce()
                if self.pin_memory:
                    batch = pin_batch(batch)
                item = ("batch", (batch, state))
            except BaseException as error:  # noqa: BLE001 (handed to the consumer, re-raised there)
                item = ("error", error)
            if not self._put(item) or item[0] == "error":
                return

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> tuple:
        kind, value = self.queue.get()
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting for room
                self.queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


def pin_batch(batch: dict) -> dict:
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def to_device(batch: dict, device: torch.device | str | None) -> dict:
    """Tensors of the batch on `device`; from pinned memory the copy does not block the host."""
    if device is None:
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
