"""Shared fixtures: the ``backend`` fixture (every backend, GPU ones skipped with a reason), GPU skipping, and
the small CPU machine (``m``) and address space (``mm``) of the core tests."""

from __future__ import annotations

import functools

import pytest
from support import finish_within

from dmamig import Machine
from dmamig.backends import cuda_unavailable_reason


@functools.lru_cache(maxsize=1)
def _gpu_skip_reason() -> str | None:
    reason = cuda_unavailable_reason()
    return None if reason is None else f"no usable GPU: {reason}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test marked ``gpu`` (with the reason) where no CUDA GPU is usable; run them where one is."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = _gpu_skip_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=reason)
    for item in gpu_items:
        item.add_marker(marker)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request: pytest.FixtureRequest) -> str:
    """Name of a backend to test (``"cpu"``, and ``"cuda"`` where a GPU is usable); pass it as ``backend=``."""
    if request.param == "cuda":
        reason = _gpu_skip_reason()
        if reason is not None:
            pytest.skip(reason)
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
