"""The load generator's clients without sockets: how a connection rests in another proxy's turn
(`bench.loadgen.in_turns`).  Async only for the loop a client's future needs."""

from __future__ import annotations

import pytest

from bench import loadgen


class _Transport:
    """What a client writes, and nothing else."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


async def test_a_resting_echo_client_owes_its_next_message_until_woken() -> None:
    """In another turn's phase a connection finishes the echo it has out and sends nothing more, so the
    proxy whose turn it is carries the load alone; woken, it sends the one message it owes."""
    counts = loadgen.TurnCounts()
    client = loadgen.EchoClient(b"", 64, counts)
    transport = _Transport()
    client.transport, client.ready = transport, True  # type: ignore[assignment]
    echo = b"e" * client.frame_size
    client.data_received(echo)
    assert counts.count == 1 and transport.written == [client.frame]
    client.rest()
    client.data_received(echo[:10])
    client.data_received(echo[10:])
    assert counts.count == 2 and transport.written == [client.frame], "resting: the echo counted, nothing sent"
    client.wake()
    client.wake()
    assert transport.written == [client.frame] * 2, "woken: the one message owed, once"


async def test_a_resting_stream_client_sends_nothing_until_woken() -> None:
    counts = loadgen.TurnCounts()
    client = loadgen.StreamClient(b"", 64, in_flight=4, batch=2, counts=counts)
    transport = _Transport()
    client.transport, client.ready = transport, True  # type: ignore[assignment]
    client.rest()
    client.opened(b"")
    assert transport.written == []
    client.wake()
    assert len(transport.written) == 2 and client.sent == 4  # in flight: 4, in batches of 2
    client.rest()
    client.data_received(b"e" * client.frame_size * 2)
    assert counts.count == 2 and len(transport.written) == 2
    client.wake()
    assert len(transport.written) == 3 and client.sent - client.echoed == 4


async def test_a_turn_wakes_its_own_connections_and_rests_every_other_turns() -> None:
    clients = [[loadgen.EchoClient(b"", 64, loadgen.TurnCounts()) for _ in range(2)] for _ in range(3)]
    loadgen.give_turn(clients, 1)
    assert [[client.resting for client in turn] for turn in clients] == [[True, True], [False, False], [True, True]]
    loadgen.give_turn(clients, 0)
    assert [[client.resting for client in turn] for turn in clients] == [[False, False], [True, True], [True, True]]


async def test_two_turns_of_one_name_are_refused_before_any_connection() -> None:
    """Their results would be kept under one name, one of them lost without a word."""
    twice = (loadgen.Turn("balancer", (("127.0.0.1", 9),)), loadgen.Turn("balancer", (("127.0.0.1", 9),)))
    spec = loadgen.Spec("handshake", (), connections=1, turns=twice)
    with pytest.raises(ValueError, match="names of their own"):
        await loadgen.run_handshakes(spec)
    with pytest.raises(ValueError, match="names of their own"):
        await loadgen.run_echo(loadgen.Spec("echo", (), connections=1, turns=twice))


@pytest.mark.parametrize("phase", [0.0, -0.5, float("nan")])
async def test_a_phase_not_above_zero_is_refused_before_any_connection(phase: float) -> None:
    """`in_turns` divides the window by the phase: 0 would divide by zero, and less (or NaN) is no phase."""
    turns = (loadgen.Turn("balancer", (("127.0.0.1", 9),)), loadgen.Turn("floor", (("127.0.0.1", 9),)))
    with pytest.raises(ValueError, match="phase must be more than 0"):
        await loadgen.run_handshakes(loadgen.Spec("handshake", (), connections=1, turns=turns, phase=phase))
    with pytest.raises(ValueError, match="phase must be more than 0"):
        await loadgen.run_echo(loadgen.Spec("echo", (), connections=1, turns=turns, phase=phase))
