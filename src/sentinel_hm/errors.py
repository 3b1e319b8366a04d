"""The package's one error type."""

from __future__ import annotations


class SentinelError(Exception):
    """Raised for bad input or a state the library cannot honour.

    Messages name the offending value, what is allowed, and what to do, so the
    CLI can print them as a one-line error without a traceback.
    """
