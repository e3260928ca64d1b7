"""Device topology: for every ordered pair of devices, whether one can copy to the other directly (peer access)
and over what kind of link.

Three link classes, named after what a copy between the two devices crosses (``nvidia-smi topo -m`` names in
brackets):

* ``"nvlink"``: NVLink, directly or through NVSwitch (``NV#``).
* ``"pcie-switch"``: PCIe under one switch, or a chain of switches, not crossing a host bridge (``PIX``,
  ``PXB``).
* ``"pcie-host"``: PCIe through a CPU's host bridge or across the sockets (``PHB``, ``NODE``, ``SYS``).

Peer access is a separate yes/no per ordered pair: a copy between devices with peer access goes straight over
the link; without it the DMA engine stages it through pinned host memory (device to host, then host to device).
Peer access usually follows the link class (presets: yes for ``nvlink`` and ``pcie-switch``, no across sockets)
but a platform or a user may deny it anywhere.

On the CPU backend the topology is a setting (:class:`Topology` presets or an explicit matrix); on the CUDA
backend it is read from the runtime (see :mod:`dmamig.backends.cuda.topology`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InvalidArgument

__all__ = ["LINK_CLASSES", "MAX_DEVICES", "PRESETS", "Topology", "node_routes", "resolve_topology"]

LINK_NVLINK = "nvlink"
LINK_PCIE_SWITCH = "pcie-switch"
LINK_PCIE_HOST = "pcie-host"
#: The link classes, fastest first.
LINK_CLASSES = (LINK_NVLINK, LINK_PCIE_SWITCH, LINK_PCIE_HOST)
#: Short codes of the link classes in printed matrices.
LINK_CODES = {LINK_NVLINK: "NV", LINK_PCIE_SWITCH: "PS", LINK_PCIE_HOST: "PH"}
#: Most devices a topology describes; the node table of a Machine holds node ids in one byte.
MAX_DEVICES = 64
#: Preset names accepted by :meth:`Topology.preset`.
PRESETS = ("nvswitch", "pcie", "two-socket", "dgx1")
#: Routes of :func:`node_routes`: no device-to-device copy, a direct peer copy, a copy staged through host RAM.
ROUTE_LOCAL, ROUTE_PEER, ROUTE_STAGED = 0, 1, 2

# Relative performance rank a preset gives each class (lower is faster, as cudaDevP2PAttrPerformanceRank).
_RANK = {LINK_NVLINK: 0, LINK_PCIE_SWITCH: 1, LINK_PCIE_HOST: 2}
# Entries accepted on the diagonal of an explicit matrix (a device's link to itself is not a link).
_DIAGONAL = (None, "", "-", "local", "self")


def _check_count(name: str, n: Any) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n <= MAX_DEVICES:
        raise InvalidArgument(f"{name} must be an integer in 0..{MAX_DEVICES}, got {n!r}")
    return int(n)


def _square(name: str, rows: Any, n: int | None) -> list[list[Any]]:
    """``rows`` as an n x n list of lists (n taken from it when None), or a clear error."""
    if isinstance(rows, np.ndarray):
        rows = rows.tolist()
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise InvalidArgument(f"{name} must be a square matrix (a sequence of rows), got {type(rows).__name__}")
    size = len(rows) if n is None else n
    if len(rows) != size:
        raise InvalidArgument(f"{name} must have {size} rows (one per device), got {len(rows)}")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, np.ndarray):
            row = row.tolist()
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) != size:
            got = len(row) if isinstance(row, Sequence) and not isinstance(row, (str, bytes)) else repr(row)
            raise InvalidArgument(f"{name} row {i} must have {size} entries (one per device), got {got}")
        out.append(list(row))
    return out


class Topology:
    """Peer access and link class of every ordered pair of ``devices`` devices (immutable).

    Parameters
    ----------
    links : n x n matrix of str
        ``links[a][b]``: the link class a copy from device ``a`` to device ``b`` crosses, one of
        :data:`LINK_CLASSES`. Diagonal entries are ignored (``None``, ``""``, ``"-"``, ``"local"``).
    peer : n x n matrix of bool, optional
        ``peer[a][b]``: whether ``a`` copies to ``b`` directly. Default: yes over ``nvlink`` and
        ``pcie-switch``, no over ``pcie-host``.
    rank : n x n matrix of int, optional
        Relative link performance, lower is faster (CUDA's ``cudaDevP2PAttrPerformanceRank``). Default from the
        class: 0 nvlink, 1 pcie-switch, 2 pcie-host.
    native_atomics : n x n matrix of bool, optional
        Whether atomics work natively over the link (``cudaDevP2PAttrNativeAtomicSupported``). Default: nvlink.
    name : str
        What the topology is (a preset's name, ``"custom"``, ``"cuda-runtime"``).
    source : str
        Where it came from: ``"setting"`` (given to the machine) or ``"runtime"`` (read from CUDA).

    Raises
    ------
    InvalidArgument
        A matrix that is not n x n, an unknown link class, a non-boolean peer entry, a negative rank, or more
        than :data:`MAX_DEVICES` devices.

    Examples
    --------
    >>> t = Topology.two_socket(4)
    >>> t.link(0, 1), t.peer(0, 1), t.link(0, 3), t.peer(0, 3)
    ('pcie-switch', True, 'pcie-host', False)
    """

    __slots__ = ("_atomics", "_links", "_n", "_name", "_peer", "_rank", "_source")

    def __init__(self, links: Any, peer: Any = None, *, rank: Any = None, native_atomics: Any = None,
                 name: str = "custom", source: str = "setting"):
        rows = _square("links", links, None)
        n = _check_count("the number of devices", len(rows))
        link = [[""] * n for _ in range(n)]
        for a in range(n):
            for b in range(n):
                v = rows[a][b]
                if a == b:
                    if v not in _DIAGONAL and v not in LINK_CLASSES:
                        raise InvalidArgument(f"links[{a}][{a}] is a device's link to itself: leave it None, '' "
                                              f"or '-', got {v!r}")
                    continue
                if v not in LINK_CLASSES:
                    raise InvalidArgument(f"links[{a}][{b}] must be one of {LINK_CLASSES}, got {v!r}")
                link[a][b] = v
        self._n = n
        self._links = tuple(tuple(r) for r in link)
        self._peer = self._bool_matrix("peer", peer, lambda a, b: link[a][b] != LINK_PCIE_HOST)
        self._atomics = self._bool_matrix("native_atomics", native_atomics, lambda a, b: link[a][b] == LINK_NVLINK)
        if rank is None:
            rk = [[0 if a == b else _RANK[link[a][b]] for b in range(n)] for a in range(n)]
        else:
            rk = _square("rank", rank, n)
            for a in range(n):
                for b in range(n):
                    v = rk[a][b]
                    if a == b:
                        rk[a][b] = 0
                    elif not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                        raise InvalidArgument(f"rank[{a}][{b}] must be an integer >= 0, got {v!r}")
                    else:
                        rk[a][b] = int(v)
        self._rank = tuple(tuple(r) for r in rk)
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"name must be a non-empty string, got {name!r}")
        if source not in ("setting", "runtime"):
            raise InvalidArgument(f"source must be 'setting' or 'runtime', got {source!r}")
        self._name, self._source = name, source

    def _bool_matrix(self, what: str, value: Any, default: Any) -> tuple[tuple[bool, ...], ...]:
        n = self._n
        if value is None:
            return tuple(tuple(a == b or bool(default(a, b)) for b in range(n)) for a in range(n))
        rows = _square(what, value, n)
        for a in range(n):
            for b in range(n):
                v = rows[a][b]
                if not isinstance(v, (bool, np.bool_)) and v not in (0, 1):
                    raise InvalidArgument(f"{what}[{a}][{b}] must be True/False (or 1/0), got {v!r}")
        return tuple(tuple(a == b or bool(rows[a][b]) for b in range(n)) for a in range(n))

    # -- presets ---------------------------------------------------------------------------------------------------
    @classmethod
    def nvswitch(cls, n: int) -> Topology:
        """``n`` devices on one NVSwitch fabric (an HGX/DGX board): every pair NVLink, with peer access.

        The default topology of CPU-backend machines: every device-to-device copy is a direct peer copy.
        """
        n = _check_count("n", n)
        return cls([[LINK_NVLINK] * n for _ in range(n)], name=f"nvswitch({n})")

    @classmethod
    def pcie(cls, n: int, per_switch: int = 2, peer_across_switches: bool = False) -> Topology:
        """``n`` PCIe devices, ``per_switch`` under each switch, in device order.

        Pairs under one switch: ``pcie-switch`` with peer access. Pairs under different switches:
        ``pcie-host`` (their traffic crosses the host bridge), with peer access only when
        ``peer_across_switches``. ``per_switch=1`` gives a machine where every device-to-device copy is staged.
        """
        n = _check_count("n", n)
        if not isinstance(per_switch, (int, np.integer)) or isinstance(per_switch, bool) or per_switch < 1:
            raise InvalidArgument(f"per_switch must be an integer >= 1, got {per_switch!r}")
        sw = [d // per_switch for d in range(n)]
        links = [[LINK_PCIE_SWITCH if sw[a] == sw[b] else LINK_PCIE_HOST for b in range(n)] for a in range(n)]
        peer = [[sw[a] == sw[b] or bool(peer_across_switches) for b in range(n)] for a in range(n)]
        return cls(links, peer, name=f"pcie({n}, per_switch={per_switch}"
                                     f"{', peer_across_switches=True' if peer_across_switches else ''})")

    @classmethod
    def two_socket(cls, n: int, per_switch: int = 2) -> Topology:
        """``n`` PCIe devices split over two CPU sockets (the first ``ceil(n/2)`` on socket 0).

        Under one switch: ``pcie-switch``, peer access. Same socket, different switches: ``pcie-host`` through
        that socket's host bridge, peer access. Across the sockets: ``pcie-host``, no peer access (copies are
        staged through host memory, as most platforms refuse peer-to-peer across the CPU interconnect).
        """
        n = _check_count("n", n)
        if not isinstance(per_switch, (int, np.integer)) or isinstance(per_switch, bool) or per_switch < 1:
            raise InvalidArgument(f"per_switch must be an integer >= 1, got {per_switch!r}")
        half = -(-n // 2)
        sock = [0 if d < half else 1 for d in range(n)]
        sw = [(sock[d], (d - half * sock[d]) // per_switch) for d in range(n)]
        links = [[LINK_PCIE_SWITCH if sw[a] == sw[b] else LINK_PCIE_HOST for b in range(n)] for a in range(n)]
        peer = [[sock[a] == sock[b] for b in range(n)] for a in range(n)]
        return cls(links, peer, name=f"two-socket({n}, per_switch={per_switch})")

    @classmethod
    def dgx1(cls) -> Topology:
        """Eight devices in the DGX-1 hybrid cube-mesh: NVLink within each group of four and between device
        ``i`` and ``i + 4``; the other pairs cross the sockets (``pcie-host``) without peer access."""
        links = [[LINK_NVLINK if a // 4 == b // 4 or abs(a - b) == 4 else LINK_PCIE_HOST for b in range(8)]
                 for a in range(8)]
        return cls(links, name="dgx1")

    @classmethod
    def preset(cls, name: str, n: int) -> Topology:
        """The preset ``name`` (one of :data:`PRESETS`) for ``n`` devices, with its default options.

        Raises
        ------
        InvalidArgument
            An unknown name, or ``"dgx1"`` with ``n`` other than 8.
        """
        if name == "nvswitch":
            return cls.nvswitch(n)
        if name == "pcie":
            return cls.pcie(n)
        if name == "two-socket":
            return cls.two_socket(n)
        if name == "dgx1":
            if n != 8:
                raise InvalidArgument(f"the dgx1 topology has 8 devices, got {n!r}")
            return cls.dgx1()
        raise InvalidArgument(f"topology preset must be one of {PRESETS}, got {name!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Topology:
        """Rebuild a topology from :meth:`as_dict` output (a results file)."""
        if not isinstance(d, dict) or "links" not in d:
            raise InvalidArgument("a topology dict needs at least 'links' (as written by Topology.as_dict)")
        return cls(d["links"], d.get("peer"), rank=d.get("rank"), native_atomics=d.get("native_atomics"),
                   name=d.get("name", "custom"), source=d.get("source", "setting"))

    # -- queries -------------------------------------------------------------------------------------------------
    devices = property(lambda self: self._n, doc="Number of devices.")
    name = property(lambda self: self._name, doc="What the topology is: a preset name, 'custom', 'cuda-runtime'.")
    source = property(lambda self: self._source, doc="'setting' (given) or 'runtime' (read from CUDA).")
    links = property(lambda self: self._links, doc="Link classes as a tuple of rows ('' on the diagonal).")

    def _check_pair(self, a: int, b: int) -> tuple[int, int]:
        for name, v in (("a", a), ("b", b)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v < self._n:
                raise InvalidArgument(f"device {name} must be an integer in 0..{self._n - 1}, got {v!r}")
        return int(a), int(b)

    def peer(self, a: int, b: int) -> bool:
        """Whether device ``a`` copies to device ``b`` directly (always true for ``a == b``)."""
        a, b = self._check_pair(a, b)
        return self._peer[a][b]

    def staged(self, a: int, b: int) -> bool:
        """Whether a copy from device ``a`` to device ``b`` goes through host memory (no peer access)."""
        return not self.peer(a, b)

    def link(self, a: int, b: int) -> str:
        """Link class between devices ``a`` and ``b`` (``"local"`` for ``a == b``)."""
        a, b = self._check_pair(a, b)
        return "local" if a == b else self._links[a][b]

    def rank(self, a: int, b: int) -> int:
        """Relative performance rank of the link, lower is faster (0 for ``a == b``)."""
        a, b = self._check_pair(a, b)
        return self._rank[a][b]

    def native_atomics(self, a: int, b: int) -> bool:
        """Whether atomics work natively over the link from ``a`` to ``b``."""
        a, b = self._check_pair(a, b)
        return a == b or self._atomics[a][b]

    @property
    def peer_matrix(self) -> np.ndarray:
        """``(n, n)`` read-only bool array: ``[a, b]`` is :meth:`peer` ``(a, b)``."""
        out = np.array(self._peer, dtype=bool).reshape(self._n, self._n)
        out.setflags(write=False)
        return out

    def pairs(self, peer: bool | None = None) -> list[tuple[int, int]]:
        """Ordered pairs of distinct devices; only those with (``True``) or without (``False``) peer access."""
        return [(a, b) for a in range(self._n) for b in range(self._n)
                if a != b and (peer is None or self._peer[a][b] == peer)]

    def subset(self, n: int) -> Topology:
        """The topology of devices ``0..n-1`` (a machine using the first ``n`` of the devices described)."""
        n = _check_count("n", n)
        if n > self._n:
            raise InvalidArgument(f"this topology describes {self._n} devices; {n} were asked for")
        if n == self._n:
            return self
        cut = [r[:n] for r in self._links[:n]]
        return Topology(cut, [r[:n] for r in self._peer[:n]], rank=[r[:n] for r in self._rank[:n]],
                        native_atomics=[r[:n] for r in self._atomics[:n]], name=self._name, source=self._source)

    def with_peers(self, peer: Any, name: str | None = None) -> Topology:
        """The same links with peer access replaced by ``peer`` (an n x n bool matrix)."""
        return Topology(self._links, peer, rank=self._rank, native_atomics=self._atomics,
                        name=name or self._name, source=self._source)

    def as_dict(self) -> dict[str, Any]:
        """Plain-JSON description for results: name, source, devices and the four matrices."""
        return {"name": self._name, "source": self._source, "devices": self._n,
                "links": [list(r) for r in self._links], "peer": [list(r) for r in self._peer],
                "rank": [list(r) for r in self._rank], "native_atomics": [list(r) for r in self._atomics]}

    def format(self) -> str:
        """The matrix as text: one row per source device, link codes NV / PS / PH, ``*`` where staged."""
        n = self._n
        if n == 0:
            return f"{self._name}: no devices"
        head = "      " + "".join(f"{'d' + str(b):>5}" for b in range(n))
        rows = [head]
        for a in range(n):
            cells = ["   --" if a == b else f"{LINK_CODES[self._links[a][b]] + ('' if self._peer[a][b] else '*'):>5}"
                     for b in range(n)]
            rows.append(f"{'d' + str(a):<6}" + "".join(cells))
        rows.append("NV nvlink, PS pcie-switch, PH pcie-host; * no peer access: copies staged through host memory")
        return "\n".join(rows)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return (self._links, self._peer, self._rank, self._atomics) == \
            (other._links, other._peer, other._rank, other._atomics)

    def __hash__(self) -> int:
        return hash((self._links, self._peer, self._rank, self._atomics))

    def __repr__(self) -> str:
        staged = len(self.pairs(peer=False))
        return (f"Topology({self._name!r}, devices={self._n}, source={self._source!r}, "
                f"peer pairs={len(self.pairs(peer=True))}, staged pairs={staged})")


def node_routes(node_devices: Sequence[int], topology: Topology | None) -> np.ndarray:
    """Route of a copy between every pair of nodes: :data:`ROUTE_LOCAL`, ``ROUTE_PEER`` or ``ROUTE_STAGED``.

    Parameters
    ----------
    node_devices : sequence of int
        Device id of each node, ``-1`` for host nodes.
    topology : Topology or None
        ``None``: every pair of devices has peer access.

    Returns
    -------
    numpy.ndarray
        ``(nodes, nodes)`` int8; only pairs of two different devices are peer or staged.
    """
    dev = np.asarray(node_devices, dtype=np.int64)
    nn = dev.size
    if topology is not None and nn and int(dev.max()) >= topology.devices:
        raise InvalidArgument(f"the topology describes {topology.devices} devices; a node uses device "
                              f"{int(dev.max())}")
    out = np.full((nn, nn), ROUTE_LOCAL, dtype=np.int8)
    for a in range(nn):
        for b in range(nn):
            da, db = int(dev[a]), int(dev[b])
            if da < 0 or db < 0 or da == db:
                continue
            out[a, b] = ROUTE_PEER if topology is None or topology.peer(da, db) else ROUTE_STAGED
    return out


def resolve_topology(backend: Any, devices: int, topology: Topology | None) -> Topology:
    """The topology of a machine with ``devices`` devices on ``backend``, given the ``topology`` argument.

    A backend with ``runtime_topology()`` (CUDA) reports the hardware: the machine uses its first ``devices``
    devices, and ``topology`` may only take peer access away. Otherwise (CPU) ``topology`` is the setting,
    ``Topology.nvswitch(devices)`` by default.

    Raises
    ------
    InvalidArgument
        More than :data:`MAX_DEVICES` devices, a topology of another size, more devices than the GPUs visible,
        or peer access the hardware does not offer.
    """
    if devices > MAX_DEVICES:
        raise InvalidArgument(f"devices must be at most {MAX_DEVICES}, got {devices}")
    if topology is not None and topology.devices != devices:
        raise InvalidArgument(f"the topology describes {topology.devices} devices but the machine has {devices}; "
                              f"build it for {devices} (e.g. Topology.nvswitch({devices}))")
    runtime = getattr(backend, "runtime_topology", None)
    if runtime is None:
        return topology if topology is not None else Topology.nvswitch(devices)
    hw = runtime()
    if devices > hw.devices:
        raise InvalidArgument(f"devices={devices} but only {hw.devices} CUDA device(s) are visible")
    hw = hw.subset(devices)
    if topology is None:
        return hw
    extra = [p for p in topology.pairs(peer=True) if not hw.peer(*p)]
    if extra:
        raise InvalidArgument(f"these GPUs have no peer access for device pairs {extra[:4]}: on the cuda backend "
                              f"a topology can only take peer access away, the runtime decides the rest")
    if topology.peer_matrix.tolist() == hw.peer_matrix.tolist():
        return hw
    return hw.with_peers(topology.peer_matrix, name=f"{hw.name}, peers restricted")
