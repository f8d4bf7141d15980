# lb/http/_render.c: a head's bytes from its start line and fields (lb.http.head uses it when built).

from collections.abc import Sequence

def render_head(start_line: str, fields: Sequence[tuple[str, str]], /) -> bytes | None: ...
