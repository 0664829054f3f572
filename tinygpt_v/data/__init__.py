"""Data: processors, prompt templates, one module per dataset family, mixing and collate.

Importing this package registers the processors (PROCESSORS), the dataset builders (DATASETS)
and the checker of the config's `datasets:` section.

Used by the trainer:   build_train_loader(cfg.datasets, seed=..., rank=..., world_size=...)
Used by evaluation:    build_processor({"name": "blip2_image_eval", "image_size": 448}), load_image
Used by tests/demo:    make_toy_world(out_dir, seed)
"""
from . import caption, custom, grounding, instruct, pairs, processors, vqa  # noqa: F401  (registration)
from .base import IMAGE_PLACEHOLDER, MapDataset, SkipSample, StreamDataset, format_box
from .images import load_image, to_rgb
from .mixing import MixedLoader, build_dataset, build_train_loader, check_datasets_section, collate
from .processors import CLIP_MEAN, CLIP_STD, build_processor
from .toy_world import make_toy_world

__all__ = ["IMAGE_PLACEHOLDER", "MapDataset", "StreamDataset", "SkipSample", "format_box", "load_image", "to_rgb",
           "MixedLoader", "build_dataset", "build_train_loader", "check_datasets_section", "collate",
           "CLIP_MEAN", "CLIP_STD", "build_processor", "make_toy_world"]
