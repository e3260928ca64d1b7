"""Cost models: the migration core's operations charged to a modelled clock at a published machine's prices.

Measured time is what this machine does. A cost model answers what a migration would take on hardware this
machine is not (a Zen 3 server with PTDMA channels, a Xeon with I/OAT, a GPU copy engine): the migration runs
for real in the emulator, and every operation the core performs is also charged to a :class:`ModelClock`.
Modelled figures carry the model's name and never mix with measured ones.
"""

from .clock import OPS, ModelClock, ModelledTime, replay, scale_charges
from .params import CostModel, CpuCopy, DmaCosts, KernelCosts, MtCopy
from .presets import PRESETS, load_model, preset

__all__ = ["OPS", "PRESETS", "CostModel", "CpuCopy", "DmaCosts", "KernelCosts", "ModelClock", "ModelledTime",
           "MtCopy", "load_model", "preset", "replay", "scale_charges"]
