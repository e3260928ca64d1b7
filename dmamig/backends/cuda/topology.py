"""The GPU topology read from the runtime: which device pairs have peer access and what links them.

Peer access is what ``cudaDeviceCanAccessPeer`` allows and the backend enabled. The link class comes from
``cudaDeviceGetP2PAttribute``: native atomics over the link (``cudaDevP2PAttrNativeAtomicSupported``) mean
NVLink; peer access without them is PCIe under a switch; no peer access is PCIe through the host (the copy
goes through host memory whatever the wiring). CuPy does not bind that call, so it is asked of
``cupy.cuda.runtime.deviceGetP2PAttribute`` where a build offers it, else of the driver library
(``cuDeviceGetP2PAttribute`` in ``libcuda.so.1``, through ctypes); without either the class follows peer
access alone and the topology's name says so.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from ...topology import LINK_NVLINK, LINK_PCIE_HOST, LINK_PCIE_SWITCH, Topology

__all__ = ["P2P_ACCESS_SUPPORTED", "P2P_NATIVE_ATOMIC_SUPPORTED", "P2P_PERFORMANCE_RANK", "link_class",
           "p2p_attribute_reader", "read_runtime_topology"]

# cudaDeviceP2PAttr (and CUdevice_P2PAttribute: the same numbers).
P2P_PERFORMANCE_RANK = 1
P2P_ACCESS_SUPPORTED = 2
P2P_NATIVE_ATOMIC_SUPPORTED = 3


def _libcuda() -> Any:
    """The driver library through ctypes, initialised, or ``None`` where it cannot be loaded."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        if lib.cuInit(0) != 0:
            return None
        return lib
    except (OSError, AttributeError):
        return None


def p2p_attribute_reader(rt: Any) -> tuple[Callable[[int, int, int], int] | None, str]:
    """A function ``(attribute, src_device, dst_device) -> int`` reading ``cudaDeviceGetP2PAttribute``, and where
    it comes from; ``(None, why)`` when nothing here can ask."""
    fn = getattr(rt, "deviceGetP2PAttribute", None)
    if fn is not None:
        return (lambda attr, a, b: int(fn(attr, a, b))), "cupy.cuda.runtime.deviceGetP2PAttribute"
    lib = _libcuda()
    if lib is None or not hasattr(lib, "cuDeviceGetP2PAttribute"):
        return None, "no P2P attribute query (cupy does not bind it and libcuda.so.1 is not loadable)"

    def read(attr: int, a: int, b: int) -> int:
        da, db, value = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        # Driver device handles of the runtime's ordinals (both honour CUDA_VISIBLE_DEVICES).
        for ordinal, handle in ((a, da), (b, db)):
            if lib.cuDeviceGet(ctypes.byref(handle), ordinal) != 0:
                raise OSError(f"cuDeviceGet({ordinal}) failed")
        code = lib.cuDeviceGetP2PAttribute(ctypes.byref(value), attr, da, db)
        if code != 0:
            raise OSError(f"cuDeviceGetP2PAttribute({attr}, {a}, {b}) returned CUresult {code}")
        return int(value.value)

    return read, "libcuda.so.1 cuDeviceGetP2PAttribute"


def link_class(peer: bool, native_atomics: bool) -> str:
    """The link class the runtime's answers imply: native atomics over the link are NVLink; peer access without
    them is PCIe under a switch; no peer access is PCIe through the host (where the copy goes anyway)."""
    if peer and native_atomics:
        return LINK_NVLINK
    return LINK_PCIE_SWITCH if peer else LINK_PCIE_HOST


def read_runtime_topology(rt: Any, ndev: int, peers: set[tuple[int, int]],
                          reader: Callable[[int, int, int], int] | None = None, how: str = "") -> Topology:
    """The topology of ``ndev`` visible GPUs: peer access as enabled (``peers``), links from the P2P attributes.

    Parameters
    ----------
    rt : module
        ``cupy.cuda.runtime`` (or a stand-in).
    ndev : int
        Visible devices.
    peers : set of (int, int)
        Ordered pairs whose peer access the backend enabled.
    reader, how : optional
        An attribute reader and its origin (default: :func:`p2p_attribute_reader`).
    """
    if reader is None and not how:
        reader, how = p2p_attribute_reader(rt)
    links = [[""] * ndev for _ in range(ndev)]
    peer = [[a == b or (a, b) in peers for b in range(ndev)] for a in range(ndev)]
    rank: list[list[int]] | None = [[0] * ndev for _ in range(ndev)] if reader is not None else None
    atomics = [[a == b for b in range(ndev)] for a in range(ndev)]
    failed = None
    for a in range(ndev):
        for b in range(ndev):
            if a == b:
                continue
            if reader is not None and failed is None:
                try:
                    atomics[a][b] = bool(reader(P2P_NATIVE_ATOMIC_SUPPORTED, a, b))
                    rank[a][b] = max(0, reader(P2P_PERFORMANCE_RANK, a, b))
                except Exception as exc:  # an old driver or a refused query: fall back on peer access alone
                    failed = f"{type(exc).__name__}: {exc}"
            links[a][b] = link_class(peer[a][b], atomics[a][b])
    name = "cuda-runtime"
    if ndev > 1 and (reader is None or failed is not None):
        rank = None  # the class defaults say as much as is known
        atomics = [[a == b for b in range(ndev)] for a in range(ndev)]
        links = [["" if a == b else link_class(peer[a][b], False) for b in range(ndev)] for a in range(ndev)]
        name = f"cuda-runtime (links from peer access only: {failed or how})"
    return Topology(links, peer, rank=rank, native_atomics=atomics, name=name, source="runtime")
