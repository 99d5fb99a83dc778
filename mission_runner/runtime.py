"""Process-wide runtime settings that only the composition root may change.

The cyclic garbage collector. Everything the service keeps for long is acyclic: the merged
snapshots are dicts, lists and strings decoded from JSON, plus small slotted objects, and
reference counting frees each of them the moment nothing points to it any more. The
collector is only needed for the few cycles asyncio and exceptions make. Left at its
defaults, though, it costs the ingest path dearly:

- a young collection runs every 700 net container allocations, and walks every young
  object: with a transaction's rows buffered until its commit, that is thousands of
  objects walked several times over per transaction;
- a full collection runs whenever the long-lived heap has grown by a quarter, and walks
  all of it: while the snapshots grow (catch-up, a first load) that is a walk over every
  snapshot, again and again, each one longer than the last.

`tune_gc` makes both rare: it moves everything alive at the call into the permanent
generation, which collections never walk (`gc.freeze`), and raises the young threshold so a
collection runs every `YOUNG_THRESHOLD` allocations. Garbage cycles are still found, only
later: at most a few megabytes of them wait for the next collection.
"""

from __future__ import annotations

import ctypes
import gc
from typing import Final

YOUNG_THRESHOLD: Final = 50_000
"""Net container allocations between young collections (CPython's default: 700)."""

OLDER_THRESHOLDS: Final = (20, 10)
"""Young collections per middle collection, middle collections per full one (defaults 10,
10; a full collection also waits until the long-lived heap has grown by a quarter)."""


def tune_gc() -> None:
    """Tune the cyclic garbage collector for a service holding a large acyclic heap.

    Call once, from the composition root, when the process has booted: after its imports
    and the load of persisted snapshots, before streaming. Everything alive then is frozen
    out of future collections (a boot-time heap lives as long as the process); calling it
    again freezes what is alive by then, which is harmless.
    """
    gc.collect()  # boot garbage, so that freezing keeps only what is alive
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
    release_free_memory()


def release_free_memory() -> None:
    """Give the C heap's free pages back to the operating system (glibc `malloc_trim`).

    Loading the snapshots allocates and frees a lot (query results, decoded JSON); glibc
    keeps freed memory in the process unless asked. A no-op where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
