"""The label tuples of an HTTP connection's series (RouterStats.http_requests, http_duration,
http_retries: listener, the client's identity, route, cluster, status class), built once per
(listener, identity, route, cluster) and shared by every request that matches, so counting a
request is one dictionary increment."""

from __future__ import annotations

_CLASSES = ("1xx", "1xx", "2xx", "3xx", "4xx", "5xx")


class Labels:
    """Metric label tuples of one (listener, client identity, route, cluster), built once and
    reused. ``who`` is an :meth:`l7.model.Identity.labels` tuple (app, version, instance, node)."""

    __slots__ = ("by_class", "duration", "retries")

    def __init__(self, listener: str, who: tuple[str, ...], route: str, cluster: str) -> None:
        self.by_class = tuple((listener, *who, route, cluster, c) for c in _CLASSES)
        self.duration = (listener, *who, route)
        self.retries = (listener, *who, route, cluster)


_label_cache: dict[tuple[str, tuple[str, ...], str, str], Labels] = {}
# The identity of a client nothing is known about: every identity label empty.
NOBODY: tuple[str, ...] = ("", "", "", "")


def labels_for(listener: str, who: tuple[str, ...], route: str, cluster: str) -> Labels:
    key = (listener, who, route, cluster)
    labels = _label_cache.get(key)
    if labels is None:
        if len(_label_cache) >= _LABEL_CACHE_MAX:
            _label_cache.clear()  # identities come and go with instances: never grow without end
        labels = _label_cache[key] = Labels(listener, who, route, cluster)
    return labels


_LABEL_CACHE_MAX = 4096
