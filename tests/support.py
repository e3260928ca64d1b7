"""Helpers shared by the core test modules (importable because pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import threading

import pytest

#: Generous bound for joins and teardowns; a healthy run takes milliseconds.
WAIT = 30.0


def finish_within(fn, what: str, timeout: float = WAIT) -> None:
    """Run a teardown call, failing (instead of hanging) if a bug left a page locked or unmapped."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            fn()
        except BaseException as exc:  # re-raised below, on the test's thread
            errors.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{what} did not finish: something was left locked or unmapped")
    if errors:
        raise errors[0]
