"""Which database errors are worth retrying, decided by SQLSTATE and by what the server
says about itself, never by message text (the server's `lc_messages` may be any language).

- `transient(exc)`: waiting and retrying may help: the connection broke or could not be made
  (no SQLSTATE: libpq reports those without one), the server is starting, shutting down or
  out of resources (classes 08, 53, 57P0x), a serialization failure or deadlock (40001,
  40P01), a lock or statement timeout (55P03, 57014), a pool timeout. Everything else the
  server reported with a SQLSTATE (privileges, missing objects, bad data, ...) will fail
  the same way again.
- `connect_refused_for_good(conninfo)`: after a failed connection attempt, whether the
  server is up and accepting connections (`PQping`), so that the failure was ours (wrong
  credentials, database name, pg_hba rule) and waiting will not help.
"""

from __future__ import annotations

import psycopg
from psycopg import pq

_TRANSIENT_CLASSES = ("08", "53")
_TRANSIENT_CODES = frozenset(
    {
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, shutting down, in recovery)
        "57014",  # query_canceled (statement_timeout)
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available
        "58030",  # io_error
    }
)


def sqlstate_of(exc: BaseException) -> str | None:
    return exc.sqlstate if isinstance(exc, psycopg.Error) else None


def transient(exc: BaseException) -> bool:
    """True when retrying the operation later may succeed (see the module docstring)."""
    if isinstance(exc, OSError | TimeoutError):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate
    if sqlstate is None:
        # libpq's own errors: connection refused or broken, the server closed it. Errors
        # of ours (misuse, programming errors) are not OperationalErrors.
        return isinstance(exc, psycopg.OperationalError)
    return sqlstate.startswith(_TRANSIENT_CLASSES) or sqlstate in _TRANSIENT_CODES


def connect_refused_for_good(conninfo: str) -> bool:
    """After a failed connection: True when the server is up and accepting connections (or
    the parameters cannot be used at all), so the failure will repeat."""
    try:
        status = pq.PGconn.ping(conninfo.encode())
    except Exception:
        return False
    return status in (pq.Ping.OK, pq.Ping.NO_ATTEMPT)
