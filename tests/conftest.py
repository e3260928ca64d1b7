"""Shared fixtures: the ``backend`` fixture (every backend, GPU ones skipped with a reason) and GPU skipping."""

from __future__ import annotations

import functools

import pytest

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
