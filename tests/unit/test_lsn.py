from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.lsn import Lsn


def test_parse_and_format() -> None:
    lsn = Lsn.parse("16/B374D848")
    assert int(lsn) == (0x16 << 32) | 0xB374D848
    assert str(lsn) == "16/B374D848"
    assert repr(lsn) == "Lsn('16/B374D848')"
    assert str(Lsn(0)) == "0/0"


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_round_trip(value: int) -> None:
    assert Lsn.parse(str(Lsn(value))) == value


@pytest.mark.parametrize("text", ["", "16", "16/", "/1", "G/1", "1/2/3", "123456789/0"])
def test_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        Lsn.parse(text)
