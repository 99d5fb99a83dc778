"""Process-wide runtime settings: the garbage collector's tuning."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from mission_runner.runtime import OLDER_THRESHOLDS, YOUNG_THRESHOLD, tune_gc


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
    cycle: list[object] = []
    cycle.append(cycle)  # cycles made later are still collected
    del cycle
    assert gc.collect() >= 1
