"""Errors of the l7 package.

L7Error
└── ProtocolError    bytes on one connection that do not follow the wire protocol
                     (bad length, unknown type in strict mode, truncated field); the
                     connection is counted and closed, never the process
"""

from __future__ import annotations


class L7Error(Exception):
    """Base of every error l7 raises on purpose."""


class ProtocolError(L7Error):
    """The peer sent bytes that are not a valid message of the protocol.

    A decoder that raised it is poisoned: every later ``feed`` raises it again.
    """
