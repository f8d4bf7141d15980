"""lb.proxy.connecting: a backend connect's coroutine stepped as a Task would step it, without one.

Each test runs on asyncio's own loop and on uvloop's.  The coroutines are the loop's own
`create_connection` (to a loopback listener, or to a port nobody listens on) and small ones
written here to reach each way a step can go: a future that finishes, a bare `yield`, an
error before the first await, a cancel before and after the awaited future has finished.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import types
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

import pytest
import uvloop

from lb.proxy.connecting import Connecting
from tests.harness.polling import wait_for

LOOPS = pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])


def _run(new_loop: Callable[[], asyncio.AbstractEventLoop], main: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(main())  # type: ignore[arg-type]


async def _turns(count: int = 3) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


class _Recorded(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # nobody listens once it is closed


@LOOPS
def test_a_connect_that_succeeds_tells_its_protocol_and_reports_nothing(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        protocol, failures = _Recorded(), []
        connecting = Connecting(loop, loop.create_connection(lambda: protocol, "127.0.0.1", port), failures.append)
        await wait_for(connecting.done, within=1.0)
        assert connecting.done() and protocol.transport is not None and not protocol.transport.is_closing()
        await _turns()
        assert failures == []
        protocol.transport.close()
        server.close()

    _run(new_loop, main)


@LOOPS
def test_a_refused_connect_is_reported_on_a_later_turn_never_from_inside_the_call(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        failures: list[BaseException] = []
        connecting = Connecting(loop, loop.create_connection(_Recorded, "127.0.0.1", _closed_port()), failures.append)
        assert failures == []
        await wait_for(lambda: bool(failures), within=1.0)
        assert [type(exc) for exc in failures] == [ConnectionRefusedError] and connecting.done()

    _run(new_loop, main)


@LOOPS
def test_a_connect_given_up_at_once_closes_what_it_made_and_reports_nothing(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted: list[_Recorded] = []

        def accept() -> _Recorded:
            accepted.append(_Recorded())
            return accepted[-1]

        server = await loop.create_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        protocol, failures = _Recorded(), []
        connecting = Connecting(loop, loop.create_connection(lambda: protocol, "127.0.0.1", port), failures.append)
        connecting.cancel()
        connecting.cancel()  # twice is once
        await wait_for(lambda: connecting.done() and all(side.lost for side in accepted), within=1.0)
        assert connecting.done() and failures == []
        # Whatever the connect had made is closed: no transport of ours is left open, and the listener's
        # side of any connection that reached it has been hung up on.
        assert protocol.transport is None or protocol.transport.is_closing()
        assert all(side.lost for side in accepted)
        server.close()

    _run(new_loop, main)


class _Steps:
    """A connect-shaped coroutine awaiting `future` (or a bare yield first), recording what it was sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[str] = loop.create_future()
        self.seen: list[str] = []

    async def run(self, *, bare_yield: bool = False) -> str:
        if bare_yield:
            await asyncio.sleep(0)
            self.seen.append("next turn")
        try:
            result = await self.future
        except asyncio.CancelledError:
            self.seen.append("cancelled")
            raise
        self.seen.append(result)
        return result


@LOOPS
def test_a_bare_yield_is_stepped_on_the_next_turn(new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> None:
        steps = _Steps(asyncio.get_running_loop())
        connecting = Connecting(asyncio.get_running_loop(), steps.run(bare_yield=True), lambda exc: None)
        await _turns(1)  # the first step: up to the bare yield
        assert steps.seen == []
        await _turns(1)
        assert steps.seen == ["next turn"] and not connecting.done()
        steps.future.set_result("connected")
        await _turns()
        assert steps.seen == ["next turn", "connected"] and connecting.done()

    _run(new_loop, main)


@LOOPS
def test_giving_up_after_the_future_finished_throws_into_the_next_step(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    # The connect succeeded, its step is on its way, and then it is given up (the client left):
    # the coroutine must see CancelledError, as under a Task, so that it closes what it made.
    async def main() -> None:
        steps, failures = _Steps(asyncio.get_running_loop()), []
        connecting = Connecting(asyncio.get_running_loop(), steps.run(), failures.append)
        await _turns(1)  # the first step: awaiting the future
        steps.future.set_result("connected")
        connecting.cancel()
        await _turns()
        assert steps.seen == ["cancelled"] and connecting.done() and failures == []

    _run(new_loop, main)


@LOOPS
def test_nothing_runs_from_inside_the_call_that_starts_a_connect(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def fails_at_once() -> None:
        raise OSError(24, "Too many open files")

    async def main() -> None:
        failures: list[BaseException] = []
        connecting = Connecting(asyncio.get_running_loop(), fails_at_once(), failures.append)
        assert failures == [] and not connecting.done()  # not started: its first step is the loop's
        await _turns(1)
        assert [str(exc) for exc in failures] == ["[Errno 24] Too many open files"] and connecting.done()

    _run(new_loop, main)


class _NotAFuture:
    def __await__(self) -> Generator[object, None, None]:
        yield "not a future"


@LOOPS
def test_a_coroutine_awaiting_what_is_not_a_future_is_closed_and_reported(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    closed: list[bool] = []

    async def odd() -> None:
        try:
            await _NotAFuture()
        except GeneratorExit:
            closed.append(True)
            raise

    async def main() -> None:
        failures: list[BaseException] = []
        connecting = Connecting(asyncio.get_running_loop(), odd(), failures.append)
        await _turns(1)
        assert closed == [True] and connecting.done()
        assert [type(exc) for exc in failures] == [RuntimeError] and "not a future" in str(failures[0])

    _run(new_loop, main)


def test_keyboard_interrupt_is_not_a_connect_failure() -> None:
    async def interrupted() -> None:
        raise KeyboardInterrupt

    class _Loop:
        def __init__(self) -> None:
            self.soon: list[Callable[[], object]] = []

        def call_soon(self, callback: Callable[[], object]) -> None:
            self.soon.append(callback)

    loop, failures = _Loop(), []
    coroutine: Coroutine[Any, Any, Any] = interrupted()
    connecting = Connecting(loop, coroutine, failures.append)  # type: ignore[arg-type]
    (first_step,) = loop.soon
    with pytest.raises(KeyboardInterrupt):
        first_step()
    assert failures == [] and connecting.done()


@LOOPS
def test_an_ended_connect_holds_neither_its_coroutine_nor_its_callback(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    # The callback is a bound method of the backend's protocol, which holds its client connection,
    # which holds this: kept after the end, that would be a cycle only the collector frees.
    class Owner:
        def failed(self, exc: BaseException) -> None:
            pass

    async def main() -> None:
        steps, owner = _Steps(asyncio.get_running_loop()), Owner()
        gone = weakref.ref(owner)
        connecting = Connecting(asyncio.get_running_loop(), steps.run(), owner.failed)
        steps.future.set_result("connected")
        await _turns()
        assert connecting.done()
        # Nor its own step, bound once for its turns: nothing it holds leads back to it.
        assert all(getattr(held, "__self__", None) is not connecting for held in gc.get_referents(connecting))
        gc.disable()
        try:
            del owner
            assert gone() is None  # freed by reference counting alone
        finally:
            gc.enable()

    _run(new_loop, main)



def _coroutine_module() -> Any:
    """lb.proxy._coroutine, or a skip when it is not built (no C compiler: connecting steps in Python)."""
    return pytest.importorskip("lb.proxy._coroutine", reason="lb.proxy._coroutine is not built (make native)")


def test_the_c_step_gives_what_was_yielded_then_the_end_as_a_value() -> None:
    step = _coroutine_module()

    class Result:
        pass

    results = [Result()]
    held = weakref.ref(results[0])

    @types.coroutine
    def yields(first: object) -> Generator[object, None, None]:
        yield first
        yield None

    async def steps(first: object) -> Result:
        await yields(first)
        return results.pop()  # the coroutine's only reference to it, from here on

    marker = object()
    coroutine = steps(marker)
    assert step.send(coroutine) is marker
    assert step.send(coroutine) is None  # a bare yield
    assert step.send(coroutine) is step.RETURNED  # no StopIteration: the end is a value
    assert held() is None  # and the coroutine's result is let go of
    with pytest.raises(RuntimeError):
        step.send(coroutine)  # sent into after its end, as coroutine.send(None) would raise


def test_the_c_step_raises_what_the_coroutine_raised_and_runs_uvloops_own_connect() -> None:
    step = _coroutine_module()

    async def fails() -> None:
        raise ConnectionRefusedError("refused")

    coroutine = fails()
    with pytest.raises(ConnectionRefusedError, match="refused"):
        step.send(coroutine)

    async def main() -> None:
        # uvloop's create_connection is Cython's coroutine (its own am_send), not CPython's.
        loop = asyncio.get_running_loop()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            protocol = _Recorded()
            made = loop.create_connection(lambda: protocol, *listener.getsockname())
            awaited = step.send(made)
            while awaited is not step.RETURNED:
                assert isinstance(awaited, asyncio.Future)
                await asyncio.wait([awaited])
                awaited = step.send(made)
            assert protocol.transport is not None  # connected by the steps alone
            protocol.transport.close()

    _run(uvloop.new_event_loop, main)
