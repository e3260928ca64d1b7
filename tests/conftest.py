"""Shared fixtures: the ``backend`` fixture (every backend, GPU ones skipped with a reason), GPU skipping (or
failing, where a GPU is present but unusable), and
the small CPU machine (``m``) and address space (``mm``) of the core tests."""

from __future__ import annotations

import functools
import os

import pytest
from support import finish_within

from dmamig import Machine
from dmamig.backends import REQUIRE_GPU_ENV
from dmamig.backends.cuda.status import cuda_status


@functools.lru_cache(maxsize=1)
def _gpu_state() -> tuple[str, str | None]:
    """``("usable", None)``, ``("absent", reason)`` (GPU tests skip) or ``("unusable", reason)`` (they fail).

    ``DMAMIG_REQUIRE_GPU=1`` turns "absent" into "unusable": a GPU runner must not go green on skips.
    """
    status = cuda_status()
    if status.usable:
        return "usable", None
    if status.state == "absent" and os.environ.get(REQUIRE_GPU_ENV, "").strip() not in ("1", "true", "yes"):
        return "absent", f"no usable GPU: {status.reason}"
    return "unusable", f"a GPU is required but CUDA is not usable: {status.reason}"


def _gpu_skip_reason() -> str | None:
    state, reason = _gpu_state()
    return reason if state == "absent" else None


def require_gpu() -> None:
    """Skip (no GPU here) or fail (a GPU that CUDA cannot use) the calling test; return when usable."""
    state, reason = _gpu_state()
    if state == "absent":
        pytest.skip(reason)
    if state == "unusable":
        pytest.fail(reason, pytrace=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test marked ``gpu`` (with the reason) where there is no GPU; run them where one is usable.

    Where a GPU is present but unusable (e.g. an insufficient driver) they are not skipped: each fails with the
    reason, so such a runner cannot look green.
    """
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = _gpu_skip_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=reason)
    for item in gpu_items:
        item.add_marker(marker)


@pytest.fixture(scope="session")
def gpu_required() -> None:
    """For module-scoped GPU fixtures: skip (no GPU) or fail (an unusable GPU) before they touch CUDA."""
    require_gpu()


@pytest.fixture(autouse=True)
def _gpu_guard(request: pytest.FixtureRequest) -> None:
    """Fail a ``gpu`` test at setup when the GPU is present but unusable (skipped ones never get here)."""
    if request.node.get_closest_marker("gpu") is not None:
        require_gpu()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request: pytest.FixtureRequest) -> str:
    """Name of a backend to test (``"cpu"``, and ``"cuda"`` where a GPU is usable); pass it as ``backend=``."""
    if request.param == "cuda":
        require_gpu()
    return request.param


@pytest.fixture
def m(request: pytest.FixtureRequest):
    """A CPU machine with two device nodes; a module sets its node sizes with ``HOST`` and ``DEV``."""
    host = getattr(request.module, "HOST", 4096)
    dev = getattr(request.module, "DEV", host)
    mach = Machine(host_pages=host, device_pages=dev, devices=2, backend="cpu", channels=2)
    yield mach
    finish_within(mach.close, "Machine.close")


@pytest.fixture
def mm(m):
    """An address space of ``m``, closed (and checked not to hang) after the test."""
    space = m.address_space()
    yield space
    finish_within(space.close, "AddressSpace.close")
