"""Built-in workloads: deterministic per seed, inside their region, stores on the storing actor's pages."""

from __future__ import annotations

import numpy as np
import pytest

from dmamig import InvalidArgument
from dmamig.tiering import WORKLOADS, make_workload


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_same_seed_same_stream_other_seed_other_stream(name):
    a = make_workload(name, pages=128, epochs=4, per_epoch=64, actors=2, seed=7)
    b = make_workload(name, pages=128, epochs=4, per_epoch=64, actors=2, seed=7)
    c = make_workload(name, pages=128, epochs=4, per_epoch=64, actors=2, seed=8)
    assert a.equals(b)
    if name != "sequential":  # a scan's pages do not depend on the seed, only its offsets within pages do
        assert not np.array_equal(a.offset // 4096, c.offset // 4096)
    assert not a.equals(c)


@pytest.mark.parametrize("name", sorted(set(WORKLOADS) - {"stencil"}))
def test_streams_are_valid_and_stores_are_owned(name):
    t = make_workload(name, pages=128, epochs=3, per_epoch=50, actors=3, seed=1).validate()
    assert t.epochs == 3 and len(t) == 150
    page = t.offset // 4096
    assert ((page[t.write] % 3) == t.actor[t.write]).all()
    assert (t.offset % 4096 + t.length <= 4096).all()


def test_stencil_device_sweeps_and_cpu_reads_halos():
    t = make_workload("stencil", pages=32, epochs=4, per_epoch=96, seed=5, halo_share=0.25).validate()
    assert t.meta["device_actors"] == [0] and t.actors == 2 and t.epochs == 4
    dev = t.actor == 0
    page = t.offset // 4096
    assert not t.write[~dev].any() and t.write.sum() == 4 * 96 // 3  # one store per device operation
    assert (page[~dev] == page[np.flatnonzero(~dev) - 1]).all()  # a halo read follows the store it reads
    centers = page[t.write]
    assert (np.diff(centers) % 32 == 1).all()  # the sweep walks the grid page after page, wrapping around
    assert 0 < (~dev).sum() < t.write.sum()
    with pytest.raises(InvalidArgument, match="actors == 2"):
        make_workload("stencil", actors=3)


def test_zipf_is_skewed_and_uniform_is_not():
    z = make_workload("zipf", pages=256, epochs=8, per_epoch=256, seed=0)
    u = make_workload("uniform", pages=256, epochs=8, per_epoch=256, seed=0)
    top = lambda t: np.sort(np.bincount(t.offset // 4096, minlength=256))[-26:].sum() / len(t)  # noqa: E731
    assert top(z) > 0.5 > top(u)


def test_phases_move_the_working_set():
    t = make_workload("phases", pages=512, epochs=8, per_epoch=256, seed=2, phase_epochs=4)
    first = np.unique(t.offset[t.epoch < 4] // 4096)
    hot = lambda sel: np.argsort(np.bincount(t.offset[sel] // 4096, minlength=512))[-50:]  # noqa: E731
    assert len(np.intersect1d(hot(t.epoch < 4), hot(t.epoch >= 4))) < 25
    assert first.size < 512


def test_unknown_workload_and_bad_arguments():
    with pytest.raises(InvalidArgument, match="built-in workloads: kvstore"):
        make_workload("nope")
    with pytest.raises(InvalidArgument, match="pages"):
        make_workload("zipf", pages=0)
    with pytest.raises(InvalidArgument, match="length"):
        make_workload("uniform", length=8192)
