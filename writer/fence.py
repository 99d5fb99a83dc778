"""The fencing token: proof, inside a transaction, that this instance still leads.

The leader lock (an advisory lock on one connection, `stream.leader`) says who may stream a
slot; but streaming, group commits and write-backs run on other connections, and they go on
for a moment after the lock's session ended (an idle connection killed by a NAT or proxy
timeout, say) while another instance takes over. The token closes that gap: the checkpoint
row of the slot carries an `epoch` that each new leader increments (`take_leadership`) right
after it took the lock and before it reads any state; every transaction that persists or
writes back on behalf of the slot checks its epoch first (`Fence.check`), in the same
transaction, taking a lock on that row.

Invariant (why the check is exact, not a race): the check locks the checkpoint row, and
`take_leadership` locks it FOR UPDATE before it increments the epoch, and FOR UPDATE
conflicts with every row lock. So either the check runs first and the new leader's increment
waits until that transaction has committed (and then reads what it wrote), or the increment
committed first and the check, re-reading the row, sees the newer epoch and the transaction
is refused (`FencedError`) with nothing written. A deposed instance can therefore never
write after a newer leader read its state.

The locks are chosen so that the guarded transactions of one leader do not wait for each
other: write-backs and claims check with FOR KEY SHARE, the group commit updates the
checkpoint (FOR NO KEY UPDATE, as no key column changes), and these two modes do not
conflict; both conflict with the increment's FOR UPDATE.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import AsyncConnection
from psycopg.rows import scalar_row

from writer.errors import FencedError


@dataclass(frozen=True, slots=True)
class Fence:
    """This instance's term as leader of `slot`."""

    slot: str
    epoch: int

    async def check(self, conn: AsyncConnection[tuple[object, ...]]) -> None:
        """Raise FencedError unless the slot's epoch is still ours. Call inside the
        transaction it guards, before its writes; the row stays locked until it ends."""
        async with conn.cursor(row_factory=scalar_row) as cur:
            await cur.execute(
                "SELECT epoch FROM mana_ai.stream_checkpoint WHERE slot_name = %s"
                " FOR KEY SHARE",
                (self.slot,),
            )
            current = await cur.fetchone()
        if current != self.epoch:
            raise FencedError(self.slot, self.epoch, current)


async def take_leadership(conn: AsyncConnection[tuple[object, ...]], slot: str) -> Fence:
    """Start a new term: increment the slot's epoch (creating its row, without a checkpoint
    position, the first time). Call with the leader lock held, before reading any state;
    it waits for a deposed instance's guarded transaction in flight to end."""
    async with conn.transaction(), conn.cursor(row_factory=scalar_row) as cur:
        await cur.execute(
            "INSERT INTO mana_ai.stream_checkpoint (slot_name, lsn, epoch, updated_at)"
            " VALUES (%s, NULL, 0, now()) ON CONFLICT (slot_name) DO NOTHING",
            (slot,),
        )
        # FOR UPDATE, explicitly: an UPDATE of the epoch alone would lock FOR NO KEY
        # UPDATE, which does not wait for the checks' FOR KEY SHARE.
        await cur.execute(
            "SELECT epoch FROM mana_ai.stream_checkpoint WHERE slot_name = %s FOR UPDATE",
            (slot,),
        )
        await cur.execute(
            "UPDATE mana_ai.stream_checkpoint SET epoch = epoch + 1, updated_at = now()"
            " WHERE slot_name = %s RETURNING epoch",
            (slot,),
        )
        epoch = await cur.fetchone()
    assert isinstance(epoch, int)
    return Fence(slot, epoch)
