"""Process-wide runtime settings: the garbage collector's tuning."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from mission_runner.runtime import OLDER_THRESHOLDS, YOUNG_THRESHOLD, tune_gc


class _Node:
    partner: object = None


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restore_gc")
def test_tune_gc_freezes_the_boot_heap_and_raises_the_thresholds() -> None:
    booted = [{"snapshot": i} for i in range(1000)]  # a heap alive at boot
    tune_gc()
    assert gc.get_freeze_count() >= len(booted)
    assert gc.get_threshold() == (YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
    assert gc.isenabled()
    # A cycle made later is still collected: that very one, not just any garbage.
    node = _Node()
    node.partner = node
    alive = weakref.ref(node)
    del node
    assert alive() is not None  # reference counting alone cannot free a cycle
    gc.collect()
    assert alive() is None
