"""Log sequence numbers.

An LSN is a 64-bit byte position in the write-ahead log. Inside the code it is always an
`Lsn`, never the text form; the text form (`16/B374D848`) appears only at the edges: SQL
parameters, logs, settings and the status API.
"""

from __future__ import annotations

import re

_TEXT = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


class Lsn(int):
    """A WAL position. Orders and subtracts like the integer it is."""

    __slots__ = ()

    MAX_VALUE = (1 << 64) - 1

    def __new__(cls, value: int = 0) -> Lsn:
        if value < 0 or value > cls.MAX_VALUE:
            raise ValueError(f"LSN out of range: {value}")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """Parse PostgreSQL's `XXXXXXXX/XXXXXXXX` form."""
        match = _TEXT.match(text.strip())
        if match is None:
            raise ValueError(f"not an LSN (expected the form 16/B374D848): {text!r}")
        return cls((int(match.group(1), 16) << 32) | int(match.group(2), 16))

    def __str__(self) -> str:
        value = int(self)
        return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn('{self}')"


ZERO = Lsn(0)
