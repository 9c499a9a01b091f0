"""``pointsman top``: a live terminal view of the HTTP routes and the SQL listeners, from
``GET /http/stats`` and ``GET /sql/stats``.

Three parts, so that each can be tested alone:

* :func:`fetch_stats` polls the admin API (stdlib only, blocking: a terminal view that
  draws once a second needs no event loop); an instance without ``/http/stats`` (older)
  still gets its SQL view;
* :func:`render` turns the two snapshots into the text of one frame, a pure function;
* :func:`run` loops: fetch, render, draw, sleep; until Ctrl-C, or once with ``--once``.

On a terminal each frame is redrawn in place with ANSI codes; into a pipe or a file the
frames are written one after another, separated by a blank line, without escape codes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

from pointsman.errors import AdminError
from router.config import format_address

Snapshot = Mapping[str, Any]

# ANSI SGR codes. The header stays plain text when colour is off, so nothing depends on it.
_BOLD, _REVERSE, _RED, _RESET = "\x1b[1m", "\x1b[7m", "\x1b[31m", "\x1b[0m"
# Home the cursor and redraw over the previous frame: each line ends with "erase to end of
# line" and the frame with "erase below", which flickers less than clearing the whole
# screen first.
_HOME, _ERASE_LINE, _ERASE_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"

HTTP_COLUMNS = ("LISTENER", "ROUTE", "CLUSTER", "RATE/s", "5XX/s", "TOTAL", "MEAN_ms", "P50_ms", "P99_ms")
STATEMENT_COLUMNS = ("LISTENER", "APP", "VERB", "RATE/s", "TOTAL", "MEAN_ms", "P50_ms", "P99_ms")
DENIAL_COLUMNS = ("LISTENER", "APP", "RULE", "TOTAL", "RATE/s")
_TEXT_COLUMNS = 3  # the first three columns of either table are names, left-aligned


# -- fetching ------------------------------------------------------------------------------


def fetch_stats(address: tuple[str, int], timeout: float = 5.0) -> dict[str, Any]:
    """``{"http": GET /http/stats, "sql": GET /sql/stats}`` of the instance at ``address`` (a
    connectable host, not a wildcard). A section the instance does not serve (404) is None.

    Every failure (refused, timed out, an HTTP error, an answer that is not a JSON object,
    neither endpoint served) becomes an :class:`AdminError` whose message fits on one line."""
    base = f"http://{format_address(address)}"
    # SQL first: an unreachable instance is reported with the URL top always asked for.
    sql = _get_json(f"{base}/sql/stats", timeout)
    http = _get_json(f"{base}/http/stats", timeout)
    if sql is None and http is None:
        # An instance without a router component: nothing to show.
        raise AdminError(f"{base}/sql/stats: HTTP 404 Not Found")
    return {"http": http, "sql": sql}


def _get_json(url: str, timeout: float) -> dict[str, Any] | None:
    """The JSON object at ``url``; None on a 404."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 404:
            return None
        raise AdminError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"{url}: cannot reach the admin API: {reason}") from None
    if not isinstance(body, dict):
        raise AdminError(f"{url}: expected a JSON object, got {type(body).__name__}")
    return body


# -- rendering -----------------------------------------------------------------------------

# A frame is built as (style, text) lines and styled last, after any cut to the terminal's
# width, so that a cut never lands inside an escape sequence.
_Line = tuple[str, str]
# A section of the frame: the lines above its table, the table's columns (empty: no table),
# its rows, the lines below it, and a style per row.
_Section = tuple[list[_Line], Sequence[str], list[list[str]], list[_Line], list[str]]
_NO_WINDOW = "window -   rates appear once the router has two samples (about a second after start)"


def render(
    stats: Snapshot | None,
    *,
    admin: str,
    at: datetime,
    interval: float | None = None,
    error: str | None = None,
    color: bool = False,
    width: int | None = None,
    height: int | None = None,
) -> str:
    """One frame of ``pointsman top`` as text (no trailing newline). Pure: same input, same
    frame.

    ``stats`` is what :func:`fetch_stats` returns, ``{"sql": /sql/stats, "http": /http/stats}``
    (either None when the instance does not serve it: that section is left out), or None when
    there is nothing to show (``error`` then says why). A section without traffic is one line,
    "no SQL traffic" or "no HTTP traffic". ``at`` is the time printed in the header;
    ``interval`` the refresh period (omitted from the header for a single frame). ``width``
    cuts lines to the terminal; ``height`` limits the frame to the screen by dropping the
    quietest statement and route rows, with a line per table that says how many were left
    out. The denials are never dropped: they are few, and what an operator looks for first."""
    title = f"pointsman top - admin {admin} - {at:%Y-%m-%d %H:%M:%S}"
    if interval is not None:
        title += f" - every {interval:g}s"
    lines: list[_Line] = [(_BOLD, title)]
    if error is not None:
        # Wrapped, not cut like the other lines: the end of the message is the reason.
        text = f"error: {error}"
        lines += [(_BOLD + _RED, part) for part in (textwrap.wrap(text, width) if width else [text])]
    if stats is not None:
        sql, http = stats.get("sql"), stats.get("http")
        # Each section: the lines always shown, its table's heading and rows, the lines after.
        sections: list[_Section] = []
        if sql is not None:
            sections.append(_sql_section(sql, first=not sections))
        if http is not None:
            sections.append(_http_section(http, first=not sections))
        fixed = len(lines) + sum(
            len(head) + len(tail) + (1 if columns else 0) for head, columns, _, tail, _ in sections
        )
        rooms = _share(None if height is None else height - fixed, [len(rows) for _, _, rows, _, _ in sections])
        for (head, columns, rows, tail, styles), room in zip(sections, rooms, strict=True):
            lines += head
            if columns:
                lines += _table(columns, rows, room, empty="", styles=styles)
            lines += tail
    if width is not None:
        lines = [(style, text[:width]) for style, text in lines]
    return "\n".join(f"{style}{text}{_RESET}" if color and style and text else text for style, text in lines)


def _share(room: int | None, wanted: Sequence[int]) -> list[int | None]:
    """Split ``room`` lines between tables that want ``wanted`` rows: all of them when they
    fit; otherwise evenly, what a small table leaves over going to the bigger ones."""
    if room is None or sum(wanted) <= room:
        return [None] * len(wanted)
    out: list[int | None] = [None] * len(wanted)
    left = max(room, 0)
    by_size = sorted(range(len(wanted)), key=lambda i: wanted[i])
    for n, i in enumerate(by_size):
        share = min(wanted[i], left // (len(by_size) - n))
        out[i] = share
        left -= share
    return out


def _sql_section(snapshot: Snapshot, *, first: bool) -> _Section:
    statements = sorted(
        snapshot.get("statements", []),
        key=lambda r: (-_num(r.get("rate")), -_num(r.get("total")), *_names(r, "listener", "app", "verb")),
    )
    denials = sorted(
        snapshot.get("denied", []),
        key=lambda r: (-_num(r.get("rate")), -_num(r.get("total")), *_names(r, "listener", "app", "rule")),
    )
    gap: list[_Line] = [] if first else [("", "")]
    open_sessions = any(_num(s.get("active")) > 0 for s in snapshot.get("sessions", []))
    if not statements and not denials and not open_sessions:
        return [*gap, ("", "no SQL traffic")], (), [], [], []
    head = [*gap, *_sql_header(snapshot), ("", "")]
    rows = [_statement_cells(row) for row in statements]
    if not rows:
        # Sessions open or denials, but no statement through yet.
        return [*head, ("", "no SQL statements yet")], (), [], [("", ""), *_denial_table(denials)], []
    return head, STATEMENT_COLUMNS, rows, [("", ""), *_denial_table(denials)], [""] * len(rows)


def _sql_header(snapshot: Snapshot) -> list[_Line]:
    lines: list[_Line] = []
    window = _num(snapshot.get("window_seconds"))
    statements = snapshot.get("statements", [])
    denials = snapshot.get("denied", [])
    if window > 0:
        rates = (
            f"window {window:.1f}s   statements {sum(_num(r.get('rate')) for r in statements):.1f}/s"
            f"   denied {sum(_num(r.get('rate')) for r in denials):.1f}/s"
        )
    else:
        rates = _NO_WINDOW
    lines.append(("", rates))
    cache = snapshot.get("classify_cache") or {}
    hit_rate = cache.get("hit_rate")
    hits, misses = int(_num(cache.get("hits"))), int(_num(cache.get("misses")))
    if hit_rate is None:
        lines.append(("", "classify cache: no lookups yet"))
    else:
        lines.append(("", f"classify cache: {hit_rate * 100:.1f}% hits ({hits} hits, {misses} misses)"))

    # Active sessions per app, over every listener: the question is "who is connected".
    per_app: dict[str, float] = {}
    for session in snapshot.get("sessions", []):
        app = str(session.get("app", ""))
        per_app[app] = per_app.get(app, 0.0) + _num(session.get("active"))
    open_apps = sorted(((n, app) for app, n in per_app.items() if n > 0), key=lambda item: (-item[0], item[1]))
    if open_apps:
        total = sum(n for n, _ in open_apps)
        listed = ", ".join(f"{app or '-'} {n:.0f}" for n, app in open_apps)
        lines.append(("", f"sessions: {total:.0f} open: {listed}"))
    else:
        lines.append(("", "sessions: none open"))
    return lines


def _http_section(snapshot: Snapshot, *, first: bool) -> _Section:
    routes = sorted(
        snapshot.get("routes", []),
        key=lambda r: (-_num(r.get("rate")), -_num(r.get("total")), *_names(r, "listener", "route", "cluster")),
    )
    gap: list[_Line] = [] if first else [("", "")]
    if not routes:
        return [*gap, ("", "no HTTP traffic")], (), [], [], []
    window = _num(snapshot.get("window_seconds"))
    if window > 0:
        rates = (
            f"window {window:.1f}s   requests {sum(_num(r.get('rate')) for r in routes):.1f}/s"
            f"   5xx {sum(_num(r.get('error_rate')) for r in routes):.1f}/s"
        )
    else:
        rates = _NO_WINDOW
    head: list[_Line] = [*gap, ("", rates), ("", _connections_line(snapshot)), ("", "")]
    rows = [_route_cells(row) for row in routes]
    # A route answering 5xx right now stands out (in red, with colour on).
    styles = [_RED if _num(row.get("error_rate")) > 0 else "" for row in routes]
    return head, HTTP_COLUMNS, rows, [], styles


def _connections_line(snapshot: Snapshot) -> str:
    """Client connections open per listener; requests in flight to each cluster's upstreams;
    the proxy's own refusals that have counters (before routing, circuit breaker)."""
    listeners = snapshot.get("listeners", [])
    clusters = snapshot.get("clusters", [])
    open_total = sum(_num(r.get("active_connections")) for r in listeners)
    parts = [f"connections: {open_total:.0f} open"]
    busy = [r for r in clusters if _num(r.get("in_flight")) > 0]
    if busy:
        listed = ", ".join(f"{r.get('cluster') or '-'} {_num(r.get('in_flight')):.0f}" for r in busy)
        parts.append(f"in flight: {listed}")
    else:
        parts.append("in flight: none")
    overflow = [r for r in clusters if _num(r.get("overflow_total")) > 0]
    if overflow:
        listed = ", ".join(
            f"{r.get('cluster') or '-'} {_num(r.get('overflow_total')):.0f} ({_num(r.get('overflow_rate')):.1f}/s)"
            for r in overflow
        )
        parts.append(f"overflow 503s: {listed}")
    rejected = [r for r in listeners if _num(r.get("rejected_total")) > 0]
    if rejected:
        listed = ", ".join(f"{r.get('listener') or '-'} {_num(r.get('rejected_total')):.0f}" for r in rejected)
        parts.append(f"refused before routing: {listed}")
    return "   ".join(parts)


def _route_cells(row: Mapping[str, Any]) -> list[str]:
    return [
        *_names(row, "listener", "route", "cluster"),
        f"{_num(row.get('rate')):.1f}",
        f"{_num(row.get('error_rate')):.1f}",
        f"{_num(row.get('total')):.0f}",
        _ms(row.get("mean_ms")),
        _ms(row.get("p50_ms")),
        _ms(row.get("p99_ms")),
    ]


def _statement_cells(row: Mapping[str, Any]) -> list[str]:
    return [
        *_names(row, "listener", "app", "verb"),
        f"{_num(row.get('rate')):.1f}",
        f"{_num(row.get('total')):.0f}",
        _ms(row.get("mean_ms")),
        _ms(row.get("p50_ms")),
        _ms(row.get("p99_ms")),
    ]


def _denial_table(denials: Sequence[Mapping[str, Any]]) -> list[_Line]:
    cells = [
        [*_names(row, "listener", "app", "rule"), f"{_num(row.get('total')):.0f}", f"{_num(row.get('rate')):.1f}"]
        for row in denials
    ]
    return _table(DENIAL_COLUMNS, cells, None, empty="no denials")


def _table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    room: int | None,
    empty: str,
    styles: Sequence[str] = (),
) -> list[_Line]:
    """Aligned columns: names left, numbers right, two spaces between. ``room`` is how many
    lines the rows may take; when they do not fit, the last one says how many are missing.
    ``styles``: one per row (default: plain)."""
    if not rows:
        return [(_REVERSE, "  ".join(columns)), ("", empty)]
    shown: Sequence[Sequence[str]] = rows
    if room is not None and len(rows) > max(room, 1):
        shown = rows[: max(room - 1, 0)]
    widths = [max(len(columns[i]), *(len(row[i]) for row in shown)) for i in range(len(columns))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i < _TEXT_COLUMNS else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out: list[_Line] = [(_REVERSE, line(columns))]
    out += [(styles[i] if i < len(styles) else "", line(row)) for i, row in enumerate(shown)]
    if len(shown) < len(rows):
        out.append(("", f"... {len(rows) - len(shown)} more (make the terminal taller)"))
    return out


def _names(row: Mapping[str, Any], *keys: str) -> list[str]:
    # An empty label (a client that sets no application_name) shows as "-", not as a gap.
    return [str(row.get(key) or "-") for key in keys]


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _ms(value: Any) -> str:
    # None: no statement of that row has completed yet (nothing timed).
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


# -- the loop ------------------------------------------------------------------------------


def run(
    address: tuple[str, int],
    *,
    interval: float = 1.0,
    once: bool = False,
    color: bool | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    fetch: Callable[[tuple[str, int], float], Mapping[str, Any]] = fetch_stats,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Show the instance at ``address`` until Ctrl-C (exit 0), or one frame with ``once``:
    exit 0, or 1 with a one-line error on ``err`` when the admin API cannot be reached.
    In the live view an unreachable API is shown in the frame and retried each interval.

    ``color`` None means: colour when ``out`` is a terminal and $NO_COLOR is unset.
    ``fetch`` and ``sleep`` are replaced by tests."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    tty = out.isatty()
    if color is None:
        color = tty and not os.environ.get("NO_COLOR")
    admin = format_address(address)
    # A hung admin API must not freeze the view for long; a single frame can afford to wait.
    timeout = 5.0 if once else max(2.0, interval)
    snapshot: Mapping[str, Any] | None

    if once:
        try:
            snapshot = fetch(address, timeout)
        except AdminError as exc:
            print(exc, file=err)
            return 1
        print(render(snapshot, admin=admin, at=datetime.now(), color=color), file=out, flush=True)
        return 0

    first = True
    try:
        while True:
            started = time.monotonic()
            error = None
            try:
                snapshot = fetch(address, timeout)
            except AdminError as exc:
                snapshot, error = None, f"{exc} (retrying every {interval:g}s)"
            if tty:
                size = shutil.get_terminal_size()
                frame = render(
                    snapshot,
                    admin=admin,
                    at=datetime.now(),
                    interval=interval,
                    error=error,
                    color=color,
                    width=size.columns,
                    height=size.lines - 1,  # the cursor's line after the last row
                )
                out.write(_HOME + frame.replace("\n", _ERASE_LINE + "\n") + _ERASE_LINE + "\n" + _ERASE_BELOW)
            else:
                frame = render(snapshot, admin=admin, at=datetime.now(), interval=interval, error=error, color=color)
                out.write(("" if first else "\n") + frame + "\n")
            out.flush()
            first = False
            # Keep the cadence: the time the request took comes off the wait.
            sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        # Ctrl-C is how a live view ends: no traceback, and the prompt on a fresh line.
        if tty:
            out.write("\n")
            out.flush()
        return 0
