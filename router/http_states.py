"""The states of an HTTP client connection, shared by the modules of the HTTP proxy
(:mod:`router.http_proxy`, :mod:`router.http_exchange`, :mod:`router.http_tries`)."""

from __future__ import annotations

from typing import Final

# Why reading from the client is paused (a bit each; reading resumes when none is left).
P_PIPELINE: Final = 1  # a request is queued behind the one in flight
P_UPSTREAM: Final = 2  # the upstream socket's write buffer is full
P_WAIT: Final = 4  # body bytes pile up while no upstream connection is ready (or a 101 is awaited)
P_DEAD: Final = 8  # the request stream is unusable (parse error): nothing more is read

# What the connection timer is measuring.
T_NONE: Final = 0
T_IDLE: Final = 1  # keep-alive connection between requests
T_HEADERS: Final = 2  # a request head is arriving
T_RESPONSE: Final = 3  # the route timeout of the request in flight
T_LINGER: Final = 4  # discarding input after the last answer, before closing

# Connection modes other than plain request/response.
M_NORMAL: Final = 0
M_UPGRADING: Final = 1  # an Upgrade request was parsed: what follows is tunnel data (or nothing)
M_TUNNEL: Final = 2  # after a 101: raw bytes both ways
M_LINGER: Final = 3  # answered and closing: input is discarded
