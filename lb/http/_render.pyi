# lb/http/_render.c: a head's bytes from its start line and fields (lb.http.head uses it when built).

from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet

def render_head(start_line: str, fields: Sequence[tuple[str, str]], /) -> bytes | None: ...
def forward_request(
    method: str,
    target: str,
    version: str,
    fields: Sequence[tuple[str, str]],
    dropped: AbstractSet[str],
    lowered: dict[str, str],
    rewrite_cookie: Callable[[str], str | None] | None,
    added: Sequence[tuple[str, str]],
    tail: Sequence[tuple[str, str]],
    /,
) -> bytes | None: ...
