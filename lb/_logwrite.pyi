# lb/_logwrite.c: access lines rendered and written straight to a descriptor (lb.log, lb.access_log use it
# when built).

from collections.abc import Callable

def write_line(fd: int, created: float, middle: str, text: str, /) -> bool: ...
def write_fields(
    fd: int, created: float, middle: str, keys: tuple[str, ...], values: tuple[object, ...], /
) -> bool: ...
def bare(text: str, /) -> bool: ...

SINK_READS: tuple[str, ...]

class AccessSink:
    def __init__(
        self, fd: int, middle: str, root: object, lb: object, access: object, handler: object, formatter: object,
        stream: object, raw: object, flush: Callable[[], object] | None, /,
    ) -> None: ...
    def write_fields(self, keys: tuple[str, ...], values: tuple[object, ...], /) -> bool | None: ...
