"""Which pool serves a path: the longest matching prefix wins.  [pure]"""

from __future__ import annotations

from collections.abc import Sequence

from lb.config.model import RouteConfig


def sort_routes(routes: Sequence[RouteConfig]) -> tuple[RouteConfig, ...]:
    """Routes ordered so that the first match is the longest prefix (done once per config)."""
    return tuple(sorted(routes, key=lambda route: len(route.path_prefix), reverse=True))


def match_route(routes: tuple[RouteConfig, ...], path: str) -> RouteConfig | None:
    """Return the route for `path`, given routes from `sort_routes`, or None.

    A prefix matches as a string prefix, as HAProxy's path_beg and Envoy's prefix do.  `routes` is the
    tuple `sort_routes` makes, not any Sequence: compiled, a tuple is indexed, where a Sequence is
    iterated through an iterator (every request is routed).
    """
    for route in routes:
        if path.startswith(route.path_prefix):
            return route
    return None
