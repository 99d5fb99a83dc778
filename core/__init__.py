"""The bottom package: what every layer shares and nothing else.

The error root, clocks, the `Lsn` type, JSON value types, instants and their text forms,
the `sync_changes` column contract, the retry backoff policy, the small asyncio helpers
and the crash-test fail points. It imports nothing of the project's other packages.
"""
