"""Mixing several datasets into one resumable stream of batches.

Each step picks one dataset with probability proportional to its `sample_ratio` (as the
original's MultiIterLoader) and takes one batch of that dataset's `batch_size` from it, so a
batch never mixes datasets (nor image and text-only samples).

Everything is a function of (seed, step, dataset positions), which makes the loader exactly
resumable:
* the dataset of step k is drawn from an rng seeded by (seed, k): the state is just k;
* a map-style dataset walks a seeded permutation per epoch: the state is (epoch, position);
* a webdataset stream is a seeded shard order + shuffle buffer per epoch: the state is
  (epoch, samples consumed); a resume replays the raw stream and drops that many, undecoded;
* every sample's own randomness comes from (seed, dataset, epoch, index).
All ranks draw the same dataset at each step; rank r reads every world_size-th element of the
permutation (map-style) or of the shuffled shard list (streams), so ranks never overlap.

Config, one entry per dataset:

    datasets:
      coco_vqa:                  # the entry name picks the builder (DATASETS registry) ...
        batch_size: 6
        sample_ratio: 15
        vis_processor: {name: blip2_image_train, image_size: 448}
        ann_paths: [...]
      refcocop:
        builder: refcoco         # ... unless `builder:` names it, so a builder can serve twice
        dataset: refcoco+
        ...

`batch_size`, `sample_ratio`, `builder`, `max_image_pixels` and `group_by_length` belong to the
loader; every other key is an argument of the builder.

`group_by_length: true` (map-style datasets) orders each epoch so a batch holds samples of
similar text length, less padding for conversation/instruction data: the epoch's seeded
permutation is cut into mega-batches of `GROUP_MEGABATCH` batches, each sorted by length and
cut into batches, and the batches of a mega-batch are shuffled (seeded). The length is a proxy
known at start-up without reading an image: the characters of the record's text. It is still a
function of (seed, epoch), so the state and a resume are unchanged.

Loading ahead (`MixedLoader(num_workers=N, prefetch=D)`, `run.num_workers` / `run.prefetch`):
N forked processes load the samples, a background thread prepares D batches ahead; the batches
are the same, in the same order, with any N and D, and a resume is exact (see prefetch.py).
"""
from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from collections.abc import Callable
from typing import Any

import torch

from ..config import register_section, to_plain
from ..registry import DATASETS, ConfigError, PositiveFloat, PositiveInt, _plain, check_kwargs
from .base import DEFAULT_MAX_IMAGE_PIXELS, MapDataset, StreamDataset, sample_rng
from .images import SkipSample
from .prefetch import Prefetcher, SampleWorkers, to_device

log = logging.getLogger(__name__)

LOADER_KEYS = ("batch_size", "sample_ratio", "builder", "max_image_pixels", "group_by_length")
GROUP_MEGABATCH = 50  # batches per length-sorted group (as transformers' LengthGroupedSampler)
# A dataset that skips this many samples in a row is broken, not unlucky: stop with an error.
MAX_CONSECUTIVE_SKIPS = 1000


def _loader_options(batch_size: PositiveInt, sample_ratio: PositiveFloat = 1.0, builder: str | None = None,
                    max_image_pixels: PositiveInt | None = DEFAULT_MAX_IMAGE_PIXELS,
                    group_by_length: bool = False) -> None:
    """Schema of the loader's own keys in a `datasets.<entry>` section."""


# --- config -------------------------------------------------------------------------------------

@register_section("datasets")
def check_datasets_section(section: Any, key: str = "datasets") -> None:
    if not isinstance(section, Mapping):
        raise ConfigError(key, "expected a mapping of dataset entries")
    for entry, options in section.items():
        entry_key = f"{key}.{entry}"
        if not isinstance(options, Mapping):
            raise ConfigError(entry_key, "expected a section with batch_size, sample_ratio and the dataset's keys")
        loader, builder_kwargs = _split_entry(options)
        check_kwargs(_loader_options, loader, entry_key)
        if loader["batch_size"] < 1:
            raise ConfigError(f"{entry_key}.batch_size", "must be at least 1")
        if loader.get("sample_ratio", 1.0) <= 0:
            raise ConfigError(f"{entry_key}.sample_ratio", "must be positive")
        builder_key = f"{entry_key}.builder" if "builder" in options else entry_key
        check_kwargs(DATASETS.get(options.get("builder", entry), builder_key), builder_kwargs, entry_key)


@register_section("paths")
def check_paths_section(section: Any, key: str = "paths") -> None:
    """`paths:` names folders once (`coco: /data/coco`) for `${paths.coco}` in dataset entries."""
    if not isinstance(section, Mapping):
        raise ConfigError(key, "expected a mapping of names to folders")
    for name in section:
        if not isinstance(section[name], str):
            raise ConfigError(f"{key}.{name}", f"expected a path string, got {section[name]!r}")


def _split_entry(options: Mapping) -> tuple[dict, dict]:
    loader = {k: options[k] for k in options if k in LOADER_KEYS}
    return loader, {k: options[k] for k in options if k not in LOADER_KEYS}


def build_dataset(entry: str, options: Mapping, key_prefix: str = "datasets"):
    """Build one `datasets.<entry>` section; errors name `datasets.<entry>.<key>`."""
    options = to_plain(options)
    loader, builder_kwargs = _split_entry(options)
    builder = DATASETS.get(loader.get("builder", entry), f"{key_prefix}.{entry}")
    try:
        check_kwargs(builder, builder_kwargs, f"{key_prefix}.{entry}")
        dataset = builder(**{k: _plain(v) for k, v in builder_kwargs.items()})
    except ConfigError as e:
        if e.key.startswith(f"{key_prefix}."):
            raise
        raise ConfigError(f"{key_prefix}.{entry}.{e.key}", e.message) from None
    dataset.set_name(entry)
    dataset.max_image_pixels = loader.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    if loader.get("group_by_length") and not isinstance(dataset, MapDataset):
        raise ConfigError(f"{key_prefix}.{entry}.group_by_length",
                          "needs a map-style dataset (annotation records); a webdataset stream has no lengths up front")
    return dataset


# --- collate ---------------------------------------------------------------------------------------

def collate(samples: list[dict]) -> dict:
    """Samples of one dataset -> the batch `TinyGPTV.forward` takes (turns always as lists)."""
    has_image = [s["image"] is not None for s in samples]
    if any(has_image) and not all(has_image):
        raise ValueError("a batch mixes samples with and without images")
    as_turns = lambda text: list(text) if isinstance(text, (list, tuple)) else [text]  # noqa: E731
    return {
        "image": torch.stack([s["image"] for s in samples]) if all(has_image) else None,
        "prompt": [as_turns(s["prompt"]) for s in samples],
        "answer": [as_turns(s["answer"]) for s in samples],
        "id": [s["id"] for s in samples],
        "dataset": [s["dataset"] for s in samples],
    }


# --- per-dataset sources ------------------------------------------------------------------------------

class MapSource:
    """Walks a seeded per-epoch permutation of a map-style dataset (this rank's share)."""

    def __init__(self, dataset: MapDataset, seed: int, rank: int, world_size: int, group_batch: int | None = None):
        if len(dataset) < world_size:
            raise ConfigError(f"datasets.{dataset.name}", f"{len(dataset)} samples cannot be split over {world_size} ranks")
        self.dataset, self.seed, self.rank, self.world_size = dataset, seed, rank, world_size
        self.group_batch = group_batch  # batch size when grouping by length, else None
        self.lengths = [record_length(r) for r in dataset.records] if group_batch else None
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(hash_seed(self.seed, self.dataset.name, self.epoch))
        order = torch.randperm(len(self.dataset), generator=generator).tolist()[self.rank::self.world_size]
        return group_by_length(order, self.lengths, self.group_batch, generator) if self.group_batch else order

    def next_tasks(self, n: int) -> list[tuple]:
        """The next n (index, rng) pairs to load; advances the position."""
        tasks = []
        for _ in range(n):
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order()
            index = self._order[self.position]
            tasks.append((index, sample_rng(self.seed, self.dataset.name, self.epoch, index)))
            self.position += 1
        return tasks

    def load(self, task: tuple) -> dict:
        index, rng = task
        try:
            return self.dataset.load_checked(index, rng)
        except SkipSample as skip:
            if re.search(rf"\brecord {index}\b", skip.detail):  # the dataset named it already
                raise
            raise SkipSample(skip.reason, f"record {index}: {skip.detail}") from None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()


class StreamSource:
    """Reads a webdataset stream; raw samples are taken here, decoded in `load`."""

    def __init__(self, dataset: StreamDataset, seed: int, rank: int, world_size: int):
        self.dataset, self.seed, self.rank, self.world_size = dataset, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._stream: Iterator | None = None

    def _open(self) -> Iterator:
        stream = self.dataset.raw_samples(self.epoch, self.seed, self.rank, self.world_size)
        with self.dataset.skips.muted():  # skips met while replaying were counted the first time
            for _ in range(self.position):  # resume: drop what was consumed, without decoding it
                next(stream, None)
        return stream

    def next_tasks(self, n: int) -> list[tuple]:
        tasks = []
        while len(tasks) < n:
            if self._stream is None:
                self._stream = self._open()
            raw = next(self._stream, None)
            if raw is None:
                if self.position == 0:
                    raise RuntimeError(f"dataset {self.dataset.name}: rank {self.rank}'s shards hold no samples")
                self.epoch, self.position, self._stream = self.epoch + 1, 0, None
                continue
            tasks.append((raw, sample_rng(self.seed, self.dataset.name, self.epoch, self.position)))
            self.position += 1
        return tasks

    def load(self, task: tuple) -> dict:
        raw, rng = task
        return self.dataset.decode(raw, rng)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch, self.position, self._stream = int(state["epoch"]), int(state["position"]), None


def record_length(record: Any) -> int:
    """Length proxy of an annotation record: the characters of every string in it."""
    if isinstance(record, str):
        return len(record)
    if isinstance(record, Mapping):
        return sum(record_length(v) for v in record.values())
    if isinstance(record, (list, tuple)):
        return sum(record_length(v) for v in record)
    return 0


def group_by_length(order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """`order` regrouped: per mega-batch, sorted by length (longest first), cut into batches of
    `batch_size`, batches shuffled with `generator` (so long batches do not always come first)."""
    mega = batch_size * GROUP_MEGABATCH
    out = []
    for start in range(0, len(order), mega):
        ranked = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches = [ranked[b:b + batch_size] for b in range(0, len(ranked), batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            out += batches[b]
    return out


def hash_seed(seed: int, name: str, epoch: int) -> int:
    return random.Random(f"{seed}/{name}/order/{epoch}").getrandbits(63)


# --- the mixed loader ----------------------------------------------------------------------------------

class MixedLoader:
    """Infinite iterator of batches over several datasets; see the module docstring."""

    def __init__(self, datasets: Mapping[str, Any], batch_sizes: Mapping[str, int], ratios: Mapping[str, float],
                 *, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0, prefetch: int = 0,
                 device: torch.device | str | None = None, group_by_length: Mapping[str, bool] | None = None):
        """`num_workers` processes load samples; `prefetch` batches are prepared ahead in a thread
        (0: on demand); `device`: where `next()` puts the batch's tensors (non-blocking from
        pinned memory when it is a CUDA device). See prefetch.py."""
        if not datasets:
            raise ConfigError("datasets", "no datasets to train on")
        self.names = list(datasets)
        self.datasets = dict(datasets)
        self.batch_sizes = {n: int(batch_sizes[n]) for n in self.names}
        total = sum(ratios[n] for n in self.names)
        self.ratios = {n: ratios[n] / total for n in self.names}
        self.seed, self.step = seed, 0
        self.used: Counter[str] = Counter()  # samples put in a batch, per dataset
        grouped = group_by_length or {}
        self.sources = {n: _source(d, seed, rank, world_size, self.batch_sizes[n] if grouped.get(n) else None)
                        for n, d in self.datasets.items()}
        self._workers = SampleWorkers(self.sources, num_workers) if num_workers > 0 else None
        self.prefetch, self.device = prefetch, device
        # run on each collated batch where it is prepared (e.g. the model's tokenisation)
        self.prepare: Callable[[dict], dict] | None = None
        self._prefetcher: Prefetcher | None = None
        self._consumed: dict | None = None  # state after the last batch handed out (prefetching)

    def __iter__(self) -> "MixedLoader":
        return self

    def __next__(self) -> dict:
        if not self.prefetch:
            return to_device(self.next_batch(), self.device)
        if self._prefetcher is None:
            self._consumed = self._live_state()
            pin = self.device is not None and torch.device(self.device).type == "cuda"
            self._prefetcher = Prefetcher(self._produce, self.prefetch, pin_memory=pin)
        batch, self._consumed = self._prefetcher.get()
        return to_device(batch, self.device)

    def next_batch(self) -> dict:
        """The next batch, prepared now (the loader's own position advances)."""
        name = self.choose(self.step)
        batch = self._batch(name)
        self.step += 1
        return self.prepare(batch) if self.prepare else batch

    def _produce(self) -> tuple[dict, dict]:
        batch = self.next_batch()
        return batch, self._live_state()

    def choose(self, step: int) -> str:
        """The dataset of a step: weighted by sample_ratio, from an rng seeded by (seed, step)."""
        rng = random.Random(f"{self.seed}/mix/{step}")
        return rng.choices(self.names, weights=[self.ratios[n] for n in self.names], k=1)[0]

    def _batch(self, name: str) -> dict:
        source, want = self.sources[name], self.batch_sizes[name]
        samples, skipped_in_a_row = [], 0
        while len(samples) < want:
            for result in self._load_all(name, source.next_tasks(want - len(samples))):
                if isinstance(result, SkipSample):
                    self.datasets[name].skips.add(result.reason, result.detail)
                    skipped_in_a_row += 1
                    if skipped_in_a_row >= MAX_CONSECUTIVE_SKIPS:
                        raise RuntimeError(f"dataset {name}: {skipped_in_a_row} samples in a row were bad; "
                                           f"skip counts {self.datasets[name].skips.as_dict()}")
                else:
                    samples.append(result)
                    skipped_in_a_row = 0
        self.used[name] += len(samples)
        return collate(samples)

    def _load_all(self, name: str, tasks: list) -> list:
        if self._workers:
            return self._workers.load_all(name, tasks)
        source, results = self.sources[name], []
        for task in tasks:
            try:
                results.append(source.load(task))
            except SkipSample as skip:
                results.append(skip)
        return results

    def skip_counts(self) -> dict[str, dict[str, int]]:
        """Skipped samples so far, {dataset: {reason: count}} (datasets without skips omitted)."""
        return {n: counts for n, counts in self.state_dict()["skips"].items() if counts}

    def health_summary(self) -> list[str]:
        """One line per dataset for the end of a run: samples used and skipped by reason (this
        process's share; the counts survive a resume), e.g.

            data coco_vqa: 1200 samples used, 3 skipped (stray_image_marker 2, truncated_image 1)
        """
        lines, state = [], self.state_dict()
        for name in self.datasets:
            skips = state["skips"][name]
            skipped = f"{sum(skips.values())} skipped ({', '.join(f'{r} {n}' for r, n in skips.items())})" \
                if skips else "none skipped"
            lines.append(f"data {name}: {state['used'][name]} samples used, {skipped}")
        return lines

    def state_dict(self) -> dict:
        """Plain ints and dicts: safe for `torch.load(weights_only=True)` and JSON. With
        prefetching, the position after the last batch handed out (not the ones prepared ahead)."""
        if self._prefetcher is not None:
            return self._consumed
        return self._live_state()

    def _live_state(self) -> dict:
        return {"step": self.step,
                "sources": {n: s.state_dict() for n, s in self.sources.items()},
                "skips": {n: d.skips.as_dict() for n, d in self.datasets.items()},
                "used": {n: self.used[n] for n in self.names}}

    def load_state_dict(self, state: Mapping) -> None:
        self._stop_prefetching()  # batches prepared from the old position are dropped
        self._apply_state(state)

    def _apply_state(self, state: Mapping) -> None:
        missing = set(self.names) - set(state["sources"])
        if missing:
            raise ValueError(f"the saved data position has no entry for dataset(s) {sorted(missing)}")
        self.step = int(state["step"])
        self.used = Counter({n: int(c) for n, c in state.get("used", {}).items() if n in self.datasets})
        for name, source in self.sources.items():
            source.load_state_dict(state["sources"][name])
            self.datasets[name].skips.counts.clear()
            self.datasets[name].skips.counts.update(state.get("skips", {}).get(name, {}))

    def _stop_prefetching(self) -> None:
        """Stop the thread; the loader's own position goes back to the last batch handed out."""
        if self._prefetcher is None:
            return
        self._prefetcher.close()
        self._prefetcher, consumed = None, self._consumed
        self._apply_state(consumed)

    def close(self) -> None:
        self._stop_prefetching()
        if self._workers:
            self._workers.close()
            self._workers = None


def _source(dataset, seed: int, rank: int, world_size: int, group_batch: int | None = None):
    if isinstance(dataset, StreamDataset):
        return StreamSource(dataset, seed, rank, world_size)
    return MapSource(dataset, seed, rank, world_size, group_batch)


def build_train_loader(datasets_cfg: Mapping, *, seed: int, rank: int = 0, world_size: int = 1,
                       num_workers: int = 0, prefetch: int = 0, device=None) -> MixedLoader:
    """The `datasets:` section -> a MixedLoader (`num_workers` processes load samples,
    `prefetch` batches are prepared ahead; see MixedLoader)."""
    check_datasets_section(datasets_cfg)
    datasets, batch_sizes, ratios, grouped = {}, {}, {}, {}
    for entry, options in to_plain(datasets_cfg).items():
        datasets[entry] = build_dataset(entry, options)
        batch_sizes[entry] = options["batch_size"]
        ratios[entry] = options.get("sample_ratio", 1.0)
        grouped[entry] = bool(options.get("group_by_length", False))
        log.info("dataset %s: %s samples, batch %d, ratio %s", entry,
                 len(datasets[entry]) if isinstance(datasets[entry], MapDataset) else "streamed",
                 batch_sizes[entry], ratios[entry])
    return MixedLoader(datasets, batch_sizes, ratios, seed=seed, rank=rank, world_size=world_size,
                       num_workers=num_workers, prefetch=prefetch, device=device, group_by_length=grouped)
