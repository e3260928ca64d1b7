"""The persistent CUDA consumer of one device's DMA channel rings (:mod:`dmamig.dma.ring`): an experiment setting,
``dma_engine="persistent"``, beside the default of one ``ring_copy`` launch per submission
(:mod:`~dmamig.backends.cuda.ring_lane`).

A :class:`PersistentRingLane` holds the lane's :class:`~dmamig.dma.ring.RingSet` in pinned host memory mapped for
the device, a few words of its own there (the stop word, the generation running, the last job each channel's
consumer saw), device memory for the kernel's round, grid barrier and staged rows (each row of a round is read
from host memory once, then copied from there), one non-blocking stream, and the
``ring_persist`` kernel (``kernels/ring_persist.cu``): one cooperative launch of a few blocks that polls every
channel's ``TAIL``, copies, publishes statuses and ``HEAD`` and advances ``HEARTBEAT``, until the rings stay idle
for the lane's idle window (the poll window, as a CPU channel's worker) or the stop word is set.

**Launch and relaunch.** The kernel is launched by the first submission, and again by a submission that finds
``IDLE`` holding the generation (launch number) launched last: that consumer has gone. The consumer stores
``IDLE``, fences and looks at every ``TAIL`` once more before it exits; a submitter stores ``TAIL``, fences and
reads ``IDLE`` (:func:`dmamig.dma.ring`'s publish): one of the two sees the other, so no job is left without a
consumer. ``IDLE`` holding an older generation means a later launch is queued behind it on the stream and
will serve the job, so no launch is made.

**Failure.** A bad row is its job's status (``STATUS_BAD_ROW``). A waiter that sees no progress asks the stream
(``cudaStreamQuery``): a CUDA error fails the lane (its jobs and every later one, :class:`DmaError`), and so does a
stream that went idle without publishing the job; a consumer whose ``HEARTBEAT`` has not moved for
:attr:`PersistentRingLane.stall_s` while the job waits is stalled and fails the lane too. :meth:`close` sets the
stop word (the consumer finishes what was published, then exits), waits for the stream at most
:data:`~dmamig.backends.cpu.channel.CLOSE_TIMEOUT` seconds asking it, fails what is left, and frees. A consumer
that does not stop in time fails the lane and keeps its memory: the device may still read it.

**Refusal.** :func:`persistent_refusal` says why a device cannot run it safely: a kernel execution timeout (a
display watchdog would kill a kernel that runs until idle), no cooperative launch (the grid barrier needs every
block resident), or a running MPS control daemon (found by its control pipe, see :func:`mps_control_pipe`: a
client's kernel that never yields its SMs starves the other clients, and MPS may not keep every block resident).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ...dma import ring as dma_ring
from ...errors import DmaError
from ..cpu.channel import CLOSE_TIMEOUT
from .codes import (
    CUDA_ERROR_NOT_READY,
    CUDA_SUCCESS,
    collect_first_error,
    cuda_error_text,
    is_sticky,
    stream_status,
)
from .memory import pinned_words
from .ring_lane import MAX_RING_CHANNELS, RingJob

__all__ = ["ATTR_COOPERATIVE_LAUNCH", "ATTR_KERNEL_EXEC_TIMEOUT", "ATTR_MULTIPROCESSOR_COUNT", "H_RUNNING",
           "H_SEEN", "H_STOP", "HOST_WORDS", "PERSISTENT_BLOCKS", "PERSISTENT_STALL_S", "PERSISTENT_THREADS",
           "SCRATCH_WORDS", "PersistentRingLane", "mps_control_pipe", "persistent_refusal"]

#: ``cudaDeviceAttr`` numbers read by :func:`persistent_refusal`.
ATTR_MULTIPROCESSOR_COUNT, ATTR_KERNEL_EXEC_TIMEOUT, ATTR_COOPERATIVE_LAUNCH = 16, 17, 95
#: Blocks of the consumer (at most one per multiprocessor, so a cooperative launch always fits): enough to keep a
#: copy engine's worth of bandwidth, few enough to leave the device's other work its SMs.
PERSISTENT_BLOCKS = 32
#: Threads per block (a multiple of 32: warp 0 of block 0 is the leader, a lane per channel).
PERSISTENT_THREADS = 256
#: Seconds a waited-for job may see neither its ``HEAD`` nor the consumer's ``HEARTBEAT`` move before the lane
#: is declared stalled (the consumer beats every 100 us while it polls and after every round of copies).
PERSISTENT_STALL_S = 5.0
# The lane's own pinned words (kernels/ring_persist.cu's H_*): the stop request, the generation running (0: none)
# and, per channel, the last job its consumer saw (the start-latency probe of benchmarks/gpu_check.py).
H_STOP, H_RUNNING, H_SEEN = 0, 1, 8
HOST_WORDS = H_SEEN + MAX_RING_CHANNELS
#: Device-memory words of the kernel's round buffers and grid barrier (kernels/ring_persist.cu's SCRATCH_WORDS).
SCRATCH_WORDS = 104
#: Where an MPS control daemon keeps its pipes unless ``CUDA_MPS_PIPE_DIRECTORY`` says otherwise.
DEFAULT_MPS_PIPE_DIRECTORY = "/tmp/nvidia-mps"


def mps_control_pipe(environ: Mapping[str, str] | None = None) -> Path | None:
    """The control pipe of a running MPS control daemon, or ``None``.

    The daemon creates ``control`` in its pipe directory (``CUDA_MPS_PIPE_DIRECTORY``, by default
    ``/tmp/nvidia-mps``) while it runs, and a CUDA client of this user connects through it; the
    ``nvidia-cuda-mps-control`` binary itself ships with every driver, so its presence says nothing.
    """
    env = os.environ if environ is None else environ
    pipe = Path(env.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_MPS_PIPE_DIRECTORY) / "control"
    return pipe if pipe.exists() else None


def persistent_refusal(rt: Any, device: int, environ: Mapping[str, str] | None = None) -> str | None:
    """Why ``dma_engine="persistent"`` must not run on ``device``, or ``None`` where it may.

    Parameters
    ----------
    rt : module
        ``cupy.cuda.runtime`` (or a stand-in offering ``deviceGetAttribute``).
    device : int
        The device.
    environ : mapping, optional
        The environment to look for MPS in (``os.environ`` by default).
    """
    try:
        timeout = int(rt.deviceGetAttribute(ATTR_KERNEL_EXEC_TIMEOUT, device))
        cooperative = int(rt.deviceGetAttribute(ATTR_COOPERATIVE_LAUNCH, device))
    except Exception as exc:
        return f"device {device}'s attributes cannot be read ({type(exc).__name__}: {exc})"
    if timeout:
        return (f"device {device} has a kernel execution timeout (cudaDevAttrKernelExecTimeout: a display "
                f"watchdog), which would kill a consumer kernel that runs until its rings go idle")
    if not cooperative:
        return (f"device {device} does not support cooperative launches (cudaDevAttrCooperativeLaunch), which the "
                f"consumer's grid barrier needs")
    pipe = mps_control_pipe(environ)
    if pipe is not None:
        return (f"an MPS control daemon is running ({pipe} exists): a consumer kernel that holds its SMs until idle "
                f"would starve the other MPS clients, and MPS need not keep all of its blocks resident")
    return None


class PersistentRingLane:
    """One device's rings, stream and persistent ``ring_persist`` consumer (see the module docstring).

    Offers what :class:`~dmamig.backends.cuda.channels.CudaChannel` uses of a lane: :attr:`rings`, :attr:`failure`,
    :meth:`job`, :attr:`launches`, :meth:`close`; and what a :class:`~dmamig.backends.cuda.ring_lane.RingJob`
    waiter uses: :attr:`device`, :attr:`poll_ns`, :meth:`fail`, :meth:`check_stream`.

    Parameters
    ----------
    cp : module
        cupy (or a stand-in offering the same names).
    device : int
        The device whose copy engine this lane models.
    channels : int
        Channels of the lane (1 to :data:`~dmamig.backends.cuda.ring_lane.MAX_RING_CHANNELS`).
    kernel : callable
        The compiled ``ring_persist`` kernel of ``device``.
    poll_us : float
        Microseconds a waiter polls ``HEAD`` before it sleeps, and the consumer's idle window before it exits.
    blocks : int
        Blocks of the cooperative launch (the caller keeps it within the device's multiprocessors).
    """

    def __init__(self, cp: Any, device: int, channels: int, kernel: Any, poll_us: float,
                 blocks: int = PERSISTENT_BLOCKS, on_sticky: Callable[[int, BaseException], None] | None = None) -> None:
        if not 1 <= int(channels) <= MAX_RING_CHANNELS:
            raise ValueError(f"a CUDA ring lane serves 1 to {MAX_RING_CHANNELS} channels, got {channels}")
        if int(blocks) < 1:
            raise ValueError(f"the persistent consumer needs at least one block, got {blocks}")
        self._cp, self._rt = cp, cp.cuda.runtime
        self.device = int(device)
        self.poll_ns = max(0, int(float(poll_us) * 1000))
        #: Nanoseconds the consumer watches empty rings before it exits (the poll window, as a CPU worker's).
        self.idle_ns = self.poll_ns
        #: Seconds without ``HEAD`` or ``HEARTBEAT`` moving before a waiter declares the consumer stalled.
        self.stall_s = PERSISTENT_STALL_S
        #: Seconds :meth:`close` waits for the consumer to stop.
        self.close_timeout = CLOSE_TIMEOUT
        self.blocks = int(blocks)
        self._kernel = kernel
        self._pinned: list[int] = []
        self._lock = threading.Lock()
        self._closed = False
        self._leaked = False
        #: Why the lane failed (a CUDA error, a stalled or vanished consumer); its jobs fail with it.
        self.failure: BaseException | None = None
        #: Kernel launches so far (the first submission's, and one per relaunch after the consumer went idle).
        self.launches = 0
        #: Told ``(device, error)`` when the lane meets a sticky CUDA error: the context is unusable from then on.
        self.on_sticky = on_sticky
        #: The last launch's generation (its number, from 1; what its ``IDLE`` stores say when it exits).
        self.generation = 0
        # Per channel: the HEARTBEAT value a waiter last saw change, and when.
        self._beats: dict[int, tuple[int, float]] = {}
        self.rings = dma_ring.RingSet(int(channels), alloc=self._alloc)
        self.host_words = self._alloc((HOST_WORDS,))
        with cp.cuda.Device(self.device):
            self.stream = cp.cuda.Stream(non_blocking=True)
            self._scratch = int(self._rt.malloc(8 * SCRATCH_WORDS))
            self._rt.memset(self._scratch, 0, 8 * SCRATCH_WORDS)
            try:
                # Room for every channel's whole ring: the most one round can stage.
                self._stage = int(self._rt.malloc(dma_ring.ROW_BYTES * self.rings.rows.shape[0]
                                                  * self.rings.rows.shape[1]))
            except Exception:
                self._rt.free(self._scratch)
                raise
        rs = self.rings
        self._args = (np.uint64(rs.ctl.ctypes.data), np.uint64(rs.rows.ctypes.data), np.uint64(rs.jobs.ctypes.data),
                      np.uint64(rs.regions.ctypes.data), np.uint64(self.host_words.ctypes.data),
                      np.uint64(self._scratch), np.uint64(self._stage), np.int32(rs.channels),
                      np.int64(rs.rows.shape[1]), np.int64(rs.jobs.shape[1]), np.int32(rs.ctl.shape[1]),
                      np.uint64(self.idle_ns))
        rs.consumer = self.doorbell

    def _alloc(self, shape: tuple[int, ...]) -> np.ndarray:
        return pinned_words(self._rt, shape, self._pinned)

    # -- submissions ------------------------------------------------------------------------------------------
    def doorbell(self, jobs: list[list[int]]) -> None:
        """A compiled submission published ``jobs`` (``[seq, IDLE seen]`` per channel, ``seq`` -1 for none); called
        by the ring set under its lock. Launches the consumer where none was launched yet, or where a channel's
        ``IDLE`` held the last launch's generation (that consumer exited); otherwise the running (or queued)
        consumer takes the jobs. A launch that fails fails those jobs and the lane."""
        if self.failure is not None or self._closed:
            self.rings.fail_unfinished(jobs)
            return
        if self.generation and not any(seq >= 0 and idle == self.generation for seq, idle in jobs):
            return
        self.relaunch()
        if self.failure is not None:
            self.rings.fail_unfinished(jobs)

    def relaunch(self) -> None:
        """Queue one more launch of the consumer on the lane's stream (the caller holds the ring set's lock, or
        nothing can publish)."""
        generation = self.generation + 1
        try:
            with self._cp.cuda.Device(self.device), self.stream:
                self._kernel((self.blocks,), (PERSISTENT_THREADS,), self._args + (np.int64(generation),),
                             enable_cooperative_groups=True)
        except Exception as exc:
            err = DmaError(f"DMA ring of device {self.device}: launching the persistent consumer (ring_persist, "
                           f"a cooperative launch of {self.blocks} blocks) failed: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            self.fail(err)
            if is_sticky(getattr(exc, "status", None)) and self.on_sticky is not None:
                self.on_sticky(self.device, err)
            return
        self.generation = generation
        self.launches += 1

    def job(self, channel: int, seq: int) -> RingJob:
        """The completion of job ``seq`` on ``channel``'s ring."""
        return RingJob(self, self.rings.rings[channel], seq)

    def seen(self, channel: int) -> int:
        """Jobs of ``channel`` the consumer has picked up (it stores this before it copies them)."""
        return int(self.host_words[H_SEEN + int(channel)])

    @property
    def running(self) -> int:
        """The generation of the consumer running now (0: none is)."""
        return int(self.host_words[H_RUNNING])

    # -- failure ------------------------------------------------------------------------------------------------
    def fail(self, error: BaseException) -> None:
        """Fail the lane: its unfinished jobs and every later one fail with ``error`` (kept in :attr:`failure`)."""
        with self._lock:
            if self.failure is None:
                self.failure = error

    def _query(self) -> int:
        return stream_status(self._rt, self.stream)

    def check_stream(self, ring: dma_ring.Ring, seq: int) -> None:
        """Ask how the consumer is doing (job ``seq`` of ``ring`` is not done): a CUDA error, a stream that went
        idle without publishing the job, or a heartbeat that has not moved for :attr:`stall_s` fails the lane."""
        code = self._query()
        if code == CUDA_SUCCESS:
            if ring.head <= seq:  # idle, and the job's HEAD never came (the stream is done: its writes are visible)
                self.fail(DmaError(f"DMA ring of device {self.device}: the persistent consumer exited without "
                                   f"publishing job {seq} of channel {ring.index}"))
            return
        if code != CUDA_ERROR_NOT_READY:
            err = DmaError(f"DMA ring of device {self.device}: the persistent consumer's stream reported "
                           f"{cuda_error_text(code, self._rt)}; its jobs did not complete")
            self.fail(err)
            if is_sticky(code) and self.on_sticky is not None:
                self.on_sticky(self.device, err)
            return
        beat, now = int(ring.ctl[dma_ring.HEARTBEAT]), time.monotonic()
        last = self._beats.get(ring.index)
        if last is None or last[0] != beat:
            self._beats[ring.index] = (beat, now)
        elif now - last[1] >= self.stall_s and ring.head <= seq:
            self.fail(DmaError(f"DMA ring of device {self.device}: the persistent consumer is stalled (its "
                               f"heartbeat has not moved for {self.stall_s:g} s while job {seq} of channel "
                               f"{ring.index} waits)"))

    # -- close --------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Set the stop word (the consumer finishes what was published, then exits), wait for the stream at most
        :attr:`close_timeout` seconds, fail every job left, then free the scratch and the pinned words. A
        consumer that does not stop in time fails the lane and its memory is kept (the device may still read
        it). Idempotent; never raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with self.rings.lock:  # no submission is between its publish and its doorbell
            self.host_words[H_STOP] = 1
        deadline = time.monotonic() + self.close_timeout
        delay = 50e-6
        code = self._query()
        while code == CUDA_ERROR_NOT_READY and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 2e-3)
            code = self._query()
        if code == CUDA_ERROR_NOT_READY:
            self.fail(DmaError(f"DMA ring of device {self.device}: the persistent consumer did not stop within "
                               f"{self.close_timeout:g} s of close(); its rings stay allocated"))
            self._leaked = True
        elif code != CUDA_SUCCESS:
            self.fail(DmaError(f"DMA ring of device {self.device}: the persistent consumer's stream reported "
                               f"{cuda_error_text(code, self._rt)} at close"))
        if not self._leaked:  # the consumer no longer runs: what it did not finish fails
            for ring in self.rings.rings:
                if ring.head < ring.tail:
                    ring.finish(ring.tail, dma_ring.STATUS_FAILED)
        self.rings.consumer = None
        # Completions and counters may still read the rings from the host: the arrays move to memory of their
        # own before the pinned memory goes (also when it is kept for a consumer that never stopped).
        self.rings.detach(keep_registered=self._leaked)
        if self._leaked:
            return
        with self._cp.cuda.Device(self.device):
            collect_first_error([lambda: self._rt.free(self._scratch), lambda: self._rt.free(self._stage)])
        collect_first_error([lambda p=p: self._rt.freeHost(p) for p in self._pinned])
        self._pinned = []
