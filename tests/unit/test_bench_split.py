"""bench.split's readers: user and system time from /proc/PID/stat (bench.procs), `strace -c`'s table and
`perf report`'s libraries."""

from __future__ import annotations

from bench import procs
from bench.split import group_libraries, parse_perf_dso, parse_strace_summary, per_handshake

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


PERF_DSO = """\
 41.99% ;[kernel.kallsyms]
 31.98% ;libpython3.11.so.1.0
  9.06% ;_native__mypyc.cpython-311-x86_64-linux-gnu.so
  8.68% ;loop.cpython-311-x86_64-linux-gnu.so
  3.99% ;libc.so.6
  1.48% ;_rust.abi3.so
  0.86% ;libcrypto.so.3
  0.51% ;_scan.cpython-311-x86_64-linux-gnu.so
  0.48% ;_asyncio.cpython-311-x86_64-linux-gnu.so
  0.09% ;_coroutine.cpython-311-x86_64-linux-gnu.so


"""


def test_perf_report_lines_become_library_shares() -> None:
    shares = parse_perf_dso(PERF_DSO)
    assert shares["[kernel.kallsyms]"] == 41.99 and shares["_coroutine.cpython-311-x86_64-linux-gnu.so"] == 0.09
    assert len(shares) == 10
    assert parse_perf_dso(" 1.00% ;libc.so.6" + " " * 20 + "\n") == {"libc.so.6": 1.0}  # perf pads the column
    assert parse_perf_dso("") == {} and parse_perf_dso("# a comment\nError: no samples\n") == {}


def test_libraries_are_grouped_by_whose_work_they_are_in_a_fixed_order() -> None:
    grouped = group_libraries(parse_perf_dso(PERF_DSO))
    assert list(grouped) == ["kernel", "interpreter (libpython)", "our compiled code", "uvloop", "libc",
                             "AEAD (cryptography, OpenSSL)", "other"]
    assert round(grouped["our compiled code"], 2) == 9.66  # mypyc's module and the C modules
    assert round(grouped["AEAD (cryptography, OpenSSL)"], 2) == 2.34
    assert round(grouped["other"], 2) == 0.48
    assert round(sum(grouped.values()), 2) == 99.12
    # A statically linked interpreter (Debian's python3.11) is its own binary, and HAProxy its own group.
    assert group_libraries({"python3.11": 50.0, "haproxy": 20.0}) == {"interpreter (libpython)": 50.0,
                                                                       "haproxy": 20.0}
