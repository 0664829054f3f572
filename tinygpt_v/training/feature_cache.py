"""Caching what the frozen vision tower + Q-Former make of each image (`run.feature_cache: DIR`).

In stages 1-3 the towers are frozen and the image processors do not augment, so an image's
Q-Former output (the vision tokens after ln_vision when there is no Q-Former) is a pure
function of the image: computed once, it serves every later epoch and the next stage (stage 1
and 2 share LAION / CC+SBU at 224 px). The connector, which trains, runs on the cached features.

Layout: `DIR/<dataset>/<size>px/<ab>/<sha1(dataset/sample id)>.pt`, each entry holding the
features, the image size, the towers' weight hash and the sum of the sample's pixels; a
`manifest.json` per `<dataset>/<size>px` folder names the towers' hash it was written with.
An entry is used only when all of (dataset, sample id, image size, towers' hash, pixel sum)
match; otherwise it is stale and rewritten (a folder of another towers' hash is cleared at
start, with a warning). A batch is either read whole from the cache (in the loader, ahead of
the step) or computed whole by the towers exactly as without a cache, then written: the loss is
the same bit for bit (fp32, tests/test_throughput_cache.py).

When every sample of every image dataset is cached at start (map-style datasets: entries >=
samples - skipped), the towers are moved off the accelerator (single-process runs).

Refused (ConfigError naming `run.feature_cache`) when a processor augments (random crop) or a
tower trains (`vision`, `ln_vision`, `qformer`, `query_tokens` in `model.trainable`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ..registry import ConfigError

log = logging.getLogger(__name__)

TOWER_GROUPS = ("vision", "ln_vision", "qformer", "query_tokens")
TOWER_MODULES = ("vision", "ln_vision", "qformer")


def check_cacheable(trainable: list[str], datasets: dict, key: str = "run.feature_cache") -> None:
    """The cache is only right when image features are a pure function of the image."""
    training = [g for g in trainable if g in TOWER_GROUPS]
    if training:
        raise ConfigError(key, f"needs frozen towers, but model.trainable trains {training}; "
                               f"remove run.feature_cache or freeze them")
    for name, dataset in datasets.items():
        if getattr(getattr(dataset, "vis_processor", None), "augments", False):
            raise ConfigError(key, f"datasets.{name}.vis_processor augments (a random crop): an image's features "
                                   f"differ every time; remove run.feature_cache or set augment: false")


def towers_hash(model) -> str:
    """sha256 over the names, dtypes and bytes of the frozen towers' weights and buffers."""
    digest = hashlib.sha256()
    for part in TOWER_MODULES:
        module = getattr(model, part, None)
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{part}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


class FeatureCache:
    def __init__(self, folder: str | os.PathLike, model, *, is_main_process: bool = True):
        self.folder = Path(folder)
        self.model = model
        self.towers = towers_hash(model)
        self.is_main_process = is_main_process
        self.hits = self.misses = self.stale = 0
        self._checked: set[Path] = set()
        self.offload_check = None  # called once at the first step (after the model was placed)

    # --- where entries live -------------------------------------------------------------------

    def dataset_folder(self, dataset: str, size: int) -> Path:
        return self.folder / dataset / f"{size}px"

    def entry_path(self, dataset: str, size: int, sample_id: str) -> Path:
        digest = hashlib.sha1(f"{dataset}/{sample_id}".encode()).hexdigest()
        return self.dataset_folder(dataset, size) / digest[:2] / f"{digest}.pt"

    def check_folder(self, dataset: str, size: int) -> None:
        """Clear a folder written with other towers' weights (stale) and claim it for ours."""
        folder = self.dataset_folder(dataset, size)
        if folder in self._checked:
            return
        self._checked.add(folder)
        manifest = folder / "manifest.json"
        if manifest.exists():
            written_by = json.loads(manifest.read_text()).get("towers")
            if written_by == self.towers:
                return
            log.warning("feature cache %s: written with other tower weights (%s, now %s): rebuilding it",
                        folder, written_by, self.towers)
            if self.is_main_process:
                shutil.rmtree(folder, ignore_errors=True)
        if self.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            manifest.write_text(json.dumps({"towers": self.towers, "image_size": size}) + "\n")

    # --- the two halves of a step -------------------------------------------------------------

    def lookup(self, batch: dict) -> dict:
        """In the loader (CPU, ahead of the step): the batch + `pixel_sums`, and
        `image_features` when every sample's entry is there and current."""
        images = batch.get("image")
        if images is None:
            return batch
        sums = images.double().sum(dim=(1, 2, 3)).tolist()
        batch = {**batch, "pixel_sums": sums}
        dataset, size = batch["dataset"][0], int(images.shape[-1])
        self.check_folder(dataset, size)
        found = []
        for sample_id, pixel_sum in zip(batch["id"], sums):
            features = self._read(self.entry_path(dataset, size, sample_id), size, pixel_sum)
            if features is None:
                self.misses += 1
                return batch
            found.append(features)
        self.hits += len(found)
        # the pixels are not needed any more: not copied to the device
        return {**batch, "image": None, "image_features": torch.stack(found)}

    def fill(self, batch: dict) -> dict:
        """Before the forward: a batch the cache could not serve goes through the towers (the
        whole batch, as without a cache) and every sample's entry is written."""
        if self.offload_check is not None:
            check, self.offload_check = self.offload_check, None
            check()
        images = batch.get("image")
        if images is None or "image_features" in batch:
            return batch
        with torch.no_grad():
            features = self.model.image_features(images)
        dataset, size = batch["dataset"][0], int(images.shape[-1])
        self.check_folder(dataset, size)
        sums = batch.get("pixel_sums") or images.double().sum(dim=(1, 2, 3)).tolist()
        host = features.detach().cpu()
        for i, sample_id in enumerate(batch["id"]):
            self._write(self.entry_path(dataset, size, sample_id), host[i], size, sums[i])
        return {**batch, "image_features": features}

    def _read(self, path: Path, size: int, pixel_sum: float) -> torch.Tensor | None:
        if not path.exists():
            return None
        try:
            entry = torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 (a torn or foreign file is a miss, rewritten)
            entry = {}
        if (entry.get("towers"), entry.get("image_size"), entry.get("pixel_sum")) != (self.towers, size, pixel_sum):
            self.stale += 1
            return None
        return entry["features"]

    def _write(self, path: Path, features: torch.Tensor, size: int, pixel_sum: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"features": features.clone(), "towers": self.towers, "image_size": size,
                    "pixel_sum": pixel_sum}, tmp)
        os.replace(tmp, path)  # readers see a whole entry or none

    # --- a complete cache ------------------------------------------------------------------------

    def is_complete(self, datasets: dict) -> bool:
        """Every map-style image dataset has an entry per sample (minus its skips so far)."""
        from ..data.base import MapDataset
        for name, dataset in datasets.items():
            if not getattr(dataset, "has_images", True):
                continue
            if not isinstance(dataset, MapDataset):
                return False  # a stream's length is unknown up front
            size = getattr(dataset.vis_processor, "image_size", None)
            folder = self.dataset_folder(name, size)
            manifest = folder / "manifest.json"
            if size is None or not manifest.exists() or json.loads(manifest.read_text()).get("towers") != self.towers:
                return False
            if sum(1 for _ in folder.glob("*/*.pt")) < len(dataset) - sum(dataset.skips.counts.values()):
                return False
        return True

    def summary(self) -> str:
        return (f"feature cache {self.folder}: {self.hits} images read, {self.misses} batches computed, "
                f"{self.stale} stale entries")


def offload_towers(model) -> None:
    """Move the vision tower, ln_vision and the Q-Former to the CPU: with a complete cache the
    step never runs them (a miss would still be computed, on the CPU)."""
    for part in TOWER_MODULES:
        if getattr(model, part, None) is not None:
            getattr(model, part).to("cpu")


def setup_input_pipeline(loader, model, run, trainable: list[str], *, num_processes: int = 1,
                         is_main_process: bool = True) -> FeatureCache | None:
    """The trainer's hook: tokenisation moves into the loader (`model.pretokenize`, ahead of the
    step when prefetching) and, with `run.feature_cache`, the cache's lookup runs there too.
    Returns the cache (its `fill` goes before the forward) or None."""
    cache = None
    if run.feature_cache:
        check_cacheable(trainable, loader.datasets)
        cache = FeatureCache(run.feature_cache, model, is_main_process=is_main_process)
        for name, dataset in loader.datasets.items():
            size = getattr(getattr(dataset, "vis_processor", None), "image_size", None)
            if getattr(dataset, "has_images", True) and size:
                cache.check_folder(name, size)
        cache.offload_check = lambda: offload_if_complete(cache, model, loader.datasets, num_processes)
    steps = [model.pretokenize] + ([cache.lookup] if cache else [])

    def prepare(batch: dict) -> dict:
        for step in steps:
            batch = step(batch)
        return batch
    loader.prepare = prepare
    return cache


def offload_if_complete(cache: FeatureCache | None, model, datasets: dict, num_processes: int) -> bool:
    if cache is None or num_processes > 1 or not cache.is_complete(datasets):
        return False
    offload_towers(model)
    log.info("feature cache %s is complete: vision tower and Q-Former moved to the CPU", cache.folder)
    return True
