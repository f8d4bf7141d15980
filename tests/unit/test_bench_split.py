"""bench.split's readers: user and system time from /proc/PID/stat (bench.procs), and `strace -c`'s table."""

from __future__ import annotations

from bench import procs
from bench.split import parse_strace_summary, per_handshake

STRACE = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 22.71    0.110790          11      9779           write
 13.56    0.066175          26      2455      2455 connect
  5.11    0.024953           3      7351      2453 epoll_ctl
  0.00    0.000000           0         1           rt_sigreturn
------ ----------- ----------- --------- --------- ----------------
100.00    0.487801          10     47330      7361 total
"""


def test_the_strace_table_is_read_call_by_call_errors_included_and_total_left_out() -> None:
    assert parse_strace_summary(STRACE) == {"write": 9779, "connect": 2455, "epoll_ctl": 7351, "rt_sigreturn": 1}
    assert parse_strace_summary("") == {}
    assert parse_strace_summary("strace: Process 7 attached\n") == {}


def test_calls_are_counted_per_backend_connect_most_first() -> None:
    calls = per_handshake(parse_strace_summary(STRACE))
    assert list(calls) == ["write", "epoll_ctl", "connect", "rt_sigreturn"]
    assert calls["connect"] == 1.0 and round(calls["write"], 2) == 3.98
    assert per_handshake({"write": 5}) == {}  # no connect: no handshakes to divide by


def test_user_and_system_time_are_fields_14_and_15_of_stat_whatever_the_command_name() -> None:
    stat = "42 (a (weird) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 100 0 0"
    assert procs.parse_stat_user_system(stat) == (250 / procs.CLOCK_TICKS, 75 / procs.CLOCK_TICKS)
