"""The migration core: migrate_pages batches, state transfer, and migrate_vma device migration."""

from .device import MigrateVma
from .options import FAITHFUL, NR_MAX_BATCHED_MIGRATION, MigrateOptions
from .result import MigrateResult, MigrateStats

__all__ = ["FAITHFUL", "NR_MAX_BATCHED_MIGRATION", "MigrateOptions", "MigrateResult", "MigrateStats", "MigrateVma"]
