"""`${file:PATH}` and the config file itself against hostile paths: a FIFO, a device, a directory.

A reload (SIGHUP) reads the config on the event loop, so an `open()` that blocks (a FIFO nobody
writes to) would freeze the whole balancer; anything but a regular file is a config problem instead.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from lb.config import document
from lb.config.load import load_config, parse_config
from lb.errors import ConfigError

KEY = "k" * 43


def config_with_key(reference: str) -> str:
    return f"""
listeners: [{{bind: "127.0.0.1:0"}}]
affinity: {{secret_keys: ["{reference}"]}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{backends: [{{id: a, address: "127.0.0.1:1"}}]}}}}
"""


def parse_within(text: str, base_dir: Path, unblock: Path | None = None) -> str:
    """The ConfigError message parsing `text` gives, failing (not hanging) if parsing blocks."""
    return error_within(lambda: parse_config(text, base_dir=base_dir, environ={}), unblock)


def error_within(load: Callable[[], object], unblock: Path | None = None, seconds: float = 5.0) -> str:
    """The ConfigError message `load()` raises, failing (not hanging) if it blocks."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            load()
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        if unblock is not None:  # let the stuck open() return so the thread ends
            fd = os.open(unblock, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        worker.join(seconds)
        pytest.fail("reading the config blocked")
    error = outcome[0]
    assert isinstance(error, ConfigError), error
    return str(error)


def test_file_reference_to_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "key"
    os.mkfifo(fifo)
    message = parse_within(config_with_key(f"${{file:{fifo}}}"), tmp_path, unblock=fifo)
    assert "not a regular file" in message and str(fifo) in message


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom"])
def test_file_reference_to_a_device_is_refused(tmp_path: Path, path: str) -> None:
    message = parse_within(config_with_key(f"${{file:{path}}}"), tmp_path)
    assert "not a regular file" in message


def test_file_reference_to_a_directory_is_refused(tmp_path: Path) -> None:
    message = parse_within(config_with_key(f"${{file:{tmp_path}}}"), tmp_path)
    assert "not a regular file" in message


def test_file_reference_through_a_symlink_still_works(tmp_path: Path) -> None:
    """Kubernetes mounts Secrets as symlinks (..data/key): a link to a regular file is fine."""
    (tmp_path / "real").write_text(KEY + "\n")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    config = parse_config(config_with_key("${file:link}"), base_dir=tmp_path, environ={})
    assert config.affinity.secret_keys[0] == KEY


@pytest.mark.parametrize("ending", ["", "\n", "\r\n", "\n\n", "\r\n\r\n"])
def test_file_reference_drops_the_line_ends_at_its_end(tmp_path: Path, ending: str) -> None:
    """README: `${file:PATH}` is the file's text without the CR/LF at its end (a Secret saved on Windows too)."""
    (tmp_path / "key").write_bytes((KEY + ending).encode())
    config = parse_config(config_with_key("${file:key}"), base_dir=tmp_path, environ={})
    assert config.affinity.secret_keys[0] == KEY


def test_config_file_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "lb.yaml"
    os.mkfifo(fifo)
    assert "not a regular file" in error_within(lambda: load_config(fifo, {}), unblock=fifo)


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """Nine lines of nested aliases stand for 9**9 values: a problem, in well under a second, not a hang."""
    levels = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = "\n".join(levels) + "\n" + config_with_key(KEY)
    started = time.monotonic()
    message = error_within(lambda: parse_config(text, base_dir=tmp_path, environ={}))
    assert time.monotonic() - started < 2.0
    assert "expands to more than" in message


def _merge_bomb(levels: int, fan: int) -> str:
    """`levels` mappings, each merging the one before `fan` times over: fan**levels pairs to build."""
    lines = ["x0: &x0 {k: 1}"]
    lines += [f"x{i}: &x{i} {{<<: [{', '.join([f'*x{i - 1}'] * fan)}]}}" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_merges_of_merges_are_refused_before_they_are_built(tmp_path: Path) -> None:
    """495 bytes of `<<` merges, nine levels of nine: PyYAML before 6.0.4 built 9**8 pairs (26 s, 760 MB)
    past every check on the node tree, which shares aliased nodes.  Counted before the build, they are one
    problem at the mapping that merges, whatever PyYAML reads the file."""
    text = _merge_bomb(8, 9) + config_with_key(KEY)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=tmp_path, environ={})
    assert time.monotonic() - started < 2.0
    merges = [p for p in info.value.problems if "merges that copy more than" in p.message]
    assert len(merges) == 1 and merges[0].path.startswith("x"), info.value.problems


@pytest.mark.parametrize(("levels", "fan", "pairs"),
                         [(1, 3, 3), (3, 2, 8), (2, 5, 25), (5, 10, 100_000), (6, 10, 1_000_000)])
def test_a_merge_is_counted_as_pyyaml_copies_it(levels: int, fan: int, pairs: int) -> None:
    """The count is what flattening without memory copies: each merged mapping's pairs, its own merges
    flattened again, every time it is named (fan**levels here), and stops past the cap."""
    loader = yaml.SafeLoader(_merge_bomb(levels, fan))
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    last = next(value for key, value in root.value if key.value == f"x{levels}")
    assert document._merged_pairs(last, {}) == min(pairs, document.MAX_MERGED_PAIRS + 1)


def test_a_large_mapping_merged_many_times_is_refused_before_it_is_built(tmp_path: Path) -> None:
    """Each merge stays under the cap, their sum does not: 400 mappings merging one of 20,000 keys (213 KB)
    took 7.5 s and 285 MB to build on any PyYAML, each mapping getting its own copy of the pairs."""
    keys = ", ".join(f"a{i}: 0" for i in range(20_000))
    text = f"t: &x {{{keys}}}\nu: [{', '.join(['{<<: *x}'] * 400)}]\n" + config_with_key(KEY)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=tmp_path, environ={})
    assert time.monotonic() - started < 2.0
    assert any("merges that copy" in p.message for p in info.value.problems), info.value.problems


def test_a_mapping_merged_into_itself_is_a_problem_not_a_hang(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("x: &x {a: 1, <<: *x}\n" + config_with_key(KEY), base_dir=tmp_path, environ={})
    assert any("merges that copy" in p.message for p in info.value.problems), info.value.problems


def test_ordinary_merges_still_build(tmp_path: Path) -> None:
    """The first backend as the template merged into the next 199: the use `<<` has in a configuration."""
    backends = ['&gw {id: gw-0, address: "127.0.0.1:9000", weight: 2}']
    backends += [f'{{<<: *gw, id: gw-{i}, address: "127.0.0.1:{9000 + i}"}}' for i in range(1, 200)]
    text = config_with_key(KEY).replace('backends: [{id: a, address: "127.0.0.1:1"}]',
                                        f"backends: [{', '.join(backends)}]")
    config = parse_config(text, base_dir=tmp_path, environ={})
    assert [b.weight for b in next(iter(config.pools.values())).backends] == [2] * 200


def test_a_file_of_too_many_values_is_one_problem_not_one_per_value(tmp_path: Path) -> None:
    """150,000 entries (about 3 MB, under the size cap) are cut short at the value cap: one problem, not
    100,000 `got <reported>` lines for the values past it."""
    text = config_with_key(KEY) + "trusted_proxies: [" + ", ".join(["10.0.0.0/8"] * 150_000) + "]\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=tmp_path, environ={})
    (problem,) = info.value.problems
    assert "expands to more than" in problem.message and "eported" not in problem.message


def test_a_config_with_a_thousand_backends_is_not_mistaken_for_a_bomb(tmp_path: Path) -> None:
    backends = ", ".join(f'{{id: gw-{i}, address: "127.0.0.{1 + i // 250}:{9000 + i}"}}' for i in range(1000))
    text = config_with_key(KEY).replace('backends: [{id: a, address: "127.0.0.1:1"}]', f"backends: [{backends}]")
    config = parse_config(text, base_dir=tmp_path, environ={})
    assert len(next(iter(config.pools.values())).backends) == 1000


# --------------------------------------------------------------------------- one source for every process


KEY_2 = "n" * 43


def test_a_source_carries_every_file_reference_as_read_and_parses_to_the_same_config(tmp_path: Path) -> None:
    """The owner's load records what each `${file:PATH}` held; a worker parsing that source gets the same
    Config even once the file says something else, or is gone: it reads none of them."""
    from lb.config.load import load_config_source
    from lb.control.metrics import config_hash

    (tmp_path / "key").write_text(KEY + "\n", encoding="utf-8")
    path = tmp_path / "lb.yaml"
    path.write_text(config_with_key("${file:key}"), encoding="utf-8")
    owners, source = load_config_source(path, {})
    assert dict(source.files) == {str(tmp_path / "key"): KEY}
    assert source.text == path.read_text(encoding="utf-8")

    (tmp_path / "key").write_text("short\n", encoding="utf-8")  # invalid now: a worker reading it would fail
    workers, again = load_config_source(path, {}, source=source)
    assert workers.affinity.secret_keys == (KEY,) and config_hash(workers) == config_hash(owners)
    assert again == source
    (tmp_path / "key").unlink()
    path.write_text("not: [the config\n", encoding="utf-8")  # nor the main file
    assert load_config_source(path, {}, source=source)[0].affinity.secret_keys == (KEY,)


def test_a_reference_missing_from_the_source_is_a_problem_not_a_read(tmp_path: Path) -> None:
    """A worker never falls back to the disk: a source without the file (a mismatched one) fails its load."""
    from lb.config.load import ConfigSource, load_config_source

    (tmp_path / "key").write_text(KEY, encoding="utf-8")
    path = tmp_path / "lb.yaml"
    path.write_text(config_with_key("${file:key}"), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config_source(path, {}, source=ConfigSource(path.read_text(encoding="utf-8"), {}))
    assert "not among the files the configuration was read with" in str(info.value)
    assert str(tmp_path / "key") in str(info.value) and KEY not in str(info.value)


def test_a_file_named_twice_is_read_once_per_load(tmp_path: Path) -> None:
    """Both places get the same content, and the source holds it once."""
    from lb.config.load import load_config_source

    (tmp_path / "key").write_text(KEY, encoding="utf-8")
    path = tmp_path / "lb.yaml"
    path.write_text(config_with_key('${file:key}", "${file:./key}'), encoding="utf-8")
    config, source = load_config_source(path, {})
    # Both gave KEY: a key given twice is kept once (lb.config.sections._secret_keys).
    assert config.affinity.secret_keys == (KEY,) and list(source.files) == [str(tmp_path / "key")]


def test_a_source_never_shows_the_secrets_it_holds(tmp_path: Path) -> None:
    """Its repr (a log line, a traceback's locals) names no file content."""
    from lb.config.load import ConfigSource

    assert KEY_2 not in repr(ConfigSource("text", {"/run/secrets/key": KEY_2}))


def _tls_config(cert: Path | str, key: Path | str) -> str:
    return f"""
listeners: [{{bind: "127.0.0.1:0", tls: {{cert: "{cert}", key: "{key}"}}}}]
affinity: {{secret_keys: ["{KEY}"]}}
routes: [{{path_prefix: /, pool: p}}]
pools: {{p: {{backends: [{{id: a, address: "127.0.0.1:1"}}]}}}}
"""


def test_a_source_carries_the_tls_files_as_read_and_a_worker_serves_them_whatever_the_disk_says(
    tmp_path: Path,
) -> None:
    """The owner's load records the certificate and key it read; a worker parsing that source builds its
    context from those bytes once the files are cut short or gone (it read them, and crash-looped)."""
    import ssl

    from lb.config.load import load_config_source
    from lb.devcerts import write_dev_certs
    from lb.tls import server_ssl_context

    certs = write_dev_certs(tmp_path / "certs", ["127.0.0.1"])
    cert_pem, key_pem = certs.server_cert.read_bytes(), certs.server_key.read_bytes()
    path = tmp_path / "lb.yaml"
    path.write_text(_tls_config("certs/server.crt", "certs/server.key"), encoding="utf-8")
    owners, source = load_config_source(path, {})
    assert dict(source.tls_files) == {str(certs.server_cert): cert_pem, str(certs.server_key): key_pem}
    assert "BEGIN" not in repr(source) and "BEGIN" not in repr(owners)  # the key is a secret

    certs.server_cert.write_text("-----BEGIN CERTIFICATE-----\ncut short\n")
    certs.server_key.unlink()
    workers, again = load_config_source(path, {}, source=source)
    assert again == source
    tls = workers.listeners[0].tls
    assert tls is not None and (tls.cert_pem, tls.key_pem) == (cert_pem, key_pem)
    assert isinstance(server_ssl_context(tls), ssl.SSLContext)
    with pytest.raises(ConfigError, match=re.escape("listeners[0].tls.key: file not found")):
        load_config_source(path, {})  # the owner's next reload reads the disk, and says what is wrong


def test_a_tls_file_missing_from_the_source_is_a_problem_not_a_read(tmp_path: Path) -> None:
    from lb.config.load import ConfigSource, load_config_source
    from lb.devcerts import write_dev_certs

    certs = write_dev_certs(tmp_path, ["127.0.0.1"])
    path = tmp_path / "lb.yaml"
    path.write_text(_tls_config(certs.server_cert, certs.server_key), encoding="utf-8")
    source = ConfigSource(path.read_text(encoding="utf-8"), {}, {str(certs.server_cert): b"x"})
    with pytest.raises(ConfigError) as info:
        load_config_source(path, {}, source=source)
    assert f"file {certs.server_key} is not among the files the configuration was read with" in str(info.value)


def test_a_tls_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "server.crt"
    os.mkfifo(fifo)
    (tmp_path / "server.key").write_text("not a key")
    message = parse_within(_tls_config(fifo, tmp_path / "server.key"), tmp_path, unblock=fifo)
    assert f"listeners[0].tls.cert: not a regular file: {fifo}" in message


def test_a_huge_tls_file_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "server.crt"
    with big.open("wb") as file:
        file.truncate(64 * 1024 * 1024)  # sparse: costs no disk
    (tmp_path / "server.key").write_text("not a key")
    message = parse_within(_tls_config(big, tmp_path / "server.key"), tmp_path)
    assert f"{big} is larger than 1 MiB: not a PEM certificate" in message
