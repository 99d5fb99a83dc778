"""Terms of leadership, as the mission runtime sees them.

The ingest (stream.supervisor) owns the leader lock and the stream; the runtime may dispatch
only while this instance leads, holds the stream and has caught up with what was committed
before. The supervisor tells it through `Terms`, an explicit hand-off the runtime awaits:

- `begin(fence)`: a new term (the lock taken, the epoch incremented, the snapshots loaded);
- `Term.dispatching`: true once the stream caught up in this term, false while the stream
  is lost (reconnecting); the runtime dispatches only while it is true (`Term.changed` is
  set on every change, and on the end; its one waiter, the runtime, clears it);
- `end(term)`: the lock is lost (or the service stops): the term is over for good, its
  fence no longer passes, the runtime stops at once and waits for the next term.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from writer.fence import Fence


@dataclass(eq=False, slots=True)
class Term:
    fence: Fence
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _dispatching: bool = False

    @property
    def epoch(self) -> int:
        return self.fence.epoch

    @property
    def dispatching(self) -> bool:
        return self._dispatching and not self.ended.is_set()

    def set_dispatching(self, on: bool) -> None:
        """The supervisor: this instance holds the stream and has caught up (or not)."""
        if on != self._dispatching:
            self._dispatching = on
            self.changed.set()


class Terms:
    """The current term, if any. `began` is set when a term begins (its one waiter, the
    runtime, clears it)."""

    def __init__(self) -> None:
        self.current: Term | None = None
        self.began = asyncio.Event()

    def begin(self, fence: Fence) -> Term:
        if self.current is not None:
            self.end(self.current)
        term = self.current = Term(fence)
        self.began.set()
        return term

    def end(self, term: Term) -> None:
        term.set_dispatching(False)
        term.ended.set()
        term.changed.set()
        if self.current is term:
            self.current = None

    def take_new(self, after: Term | None) -> Term | None:
        """The current term if it is live and not `after`; clears `began`."""
        self.began.clear()
        term = self.current
        if term is None or term is after or term.ended.is_set():
            return None
        return term
