"""The migration core: migrate_pages batches, state transfer, and migrate_vma device migration."""

from .core import MigrateResult, MigrateStats
from .vma import MigrateVma

__all__ = ["MigrateResult", "MigrateStats", "MigrateVma"]
