"""Memory estimation without a GPU: fake tensors + a dispatch-level tracker of live device
storages (scripts/estimate_memory.py). Imports the model code; nothing imports this package."""
from .estimate import Estimate, estimate_config, estimate_generation, estimate_training, format_estimates
from .tracker import CATEGORIES, StorageTracker, allocated_size
from .workloads import estimate_workload, load_workload

__all__ = ["Estimate", "estimate_config", "estimate_generation", "estimate_training", "format_estimates",
           "CATEGORIES", "StorageTracker", "allocated_size", "estimate_workload", "load_workload"]
