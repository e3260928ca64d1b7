"""The CPU backend: every node's frames a numpy buffer, DMA channels worker threads running compiled loops.

=====================  ==========================================================================================
``backend``            :class:`CpuBackend`: frames, the migrating thread's folio copies, channels, checksums,
                       copy ceilings
``copy_loops``         the compiled GIL-free copy loops (streaming and cached), with numpy fallbacks
``channel``            a channel whose worker sleeps between jobs; worker death, restart and a broken channel
``polling_channel``    a channel whose worker polls its ring, and waiters that poll its head
``ring_consumer``      the compiled loops that consume a channel's DMA ring (:mod:`dmamig.dma.ring`)
``spin``               ``cpu_relax``, ``sched_yield`` and a clock for the polling loops
=====================  ==========================================================================================

The backend is :class:`dmamig.backends.cpu.backend.CpuBackend`; import each name from the module that defines it.
"""
