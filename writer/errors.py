"""Errors of the writer layer."""

from __future__ import annotations

from core.errors import MissionRunnerError


class WriterError(MissionRunnerError):
    """An append to the database failed."""


class FencedError(WriterError):
    """A write was refused because this instance no longer leads: a newer leader has taken
    the slot's fencing token (`epoch`). Nothing of the refused transaction was written."""

    def __init__(self, slot: str, epoch: int, current: int | None) -> None:
        now = "no leader row" if current is None else f"epoch {current}"
        super().__init__(
            f"slot {slot}: this instance led in epoch {epoch}, the checkpoint row has {now}:"
            " another instance leads now"
        )
        self.slot = slot
        self.epoch = epoch
        self.current = current
