# lb/proxy/_coroutine.c: one step of a coroutine without a StopIteration (lb.proxy.connecting uses it when built).

from collections.abc import Coroutine
from typing import Any

RETURNED: object

def send(coroutine: Coroutine[Any, Any, Any], /) -> Any: ...
