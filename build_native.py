"""Compile the data plane with mypyc: `python build_native.py [--into DIR] [--require | --remove] [--stamp F]`.

Why: a WebSocket handshake runs through the modules in `DATA_PLANE`, and in Python about a third
of its instructions were the interpreter itself (the bytecode loop, frame set-up, attribute
look-ups): `python -m bench.instructions --by-function 12`. mypyc compiles the same typed source
(`mypy --strict` already holds it) to C extension modules, with native classes and direct calls.
It is the compiler mypy and black ship with; the tests run against the compiled modules, and the
`.py` files stay the pure-Python fallback for a machine without a C compiler.  Nine small modules are
written in C (`c_sources()`: lb/http/_scan.c, lb/http/_render.c, lb/affinity/_token64.c, lb/affinity/_aead.c,
lb/ws/_plain.c, lb/_logwrite.c, lb/proxy/_coroutine.c, lb/proxy/_reading.c, lb/state/_tally.c, whose headers
say why); they are built in the same step, beside the Python that stands in for each when it is not.

What: the modules are compiled from this checkout and each extension module is placed next to its
source in `DIR` (default: this checkout's `lb`, which an editable install imports; the container
image passes its installed package, whose sources must be this checkout's), each file written
under a temporary name and renamed into place, then `lb/_native.json`, the manifest
`lb.compiled` checks at start-up (the SHA-256 of every source, read before compiling). Python
imports an extension module before a `.py` of the same name; `lb` refuses to run a build that no
longer matches its sources. One build at a time per package (a lock file beside the manifest).

Without a C compiler or Python's headers, or if compiling fails, the old build is removed, the
reason is printed and the exit status is 0 (pure Python, slower per handshake, same behaviour);
`--require` makes that exit 1 (CI and the image want the compiled build or nothing). `--stamp F`
is written only when the build (or `--remove`) succeeded, so `make` tries again next time.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lb.compiled import EXT_SUFFIX, GROUP, MANIFEST, SHARED_LIBRARY, source_digest

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "lb"
# Everything a connection runs through, accept to close; not control or admin, which run per
# reload or per request to the admin port, nor the config loader.  The config's model is in: a
# handshake reads its frozen objects dozens of times, and a native class's attribute is a field
# read, where a Python object's is a dictionary lookup (-16,000 instructions per handshake).
# lb/errors.py is not: two of its errors have ValueError as a second base, which a native class cannot
# have, and a handshake that goes well raises none.
DATA_PLANE = (
    "lb/http", "lb/proxy", "lb/affinity", "lb/state", "lb/ws", "lb/log.py", "lb/access_log.py", "lb/_logwrite.c",
    "lb/tls.py", "lb/config/model.py",
)
LOCK = ".native.lock"  # in the package: one build at a time


class BuildProblem(Exception):
    """Why the data plane stays pure Python this time (printed, exit 0 unless --require)."""


def sources(pattern: str = "*.py") -> list[str]:
    """The data plane's modules, as paths relative to the checkout (`pattern` in its folders)."""
    found: list[str] = []
    for entry in DATA_PLANE:
        path = ROOT / entry
        files = sorted(path.glob(pattern)) if path.is_dir() else [path] if path.match(pattern) else []
        found += [str(file.relative_to(ROOT)) for file in files if file.name != "__init__.py"]
    return found


def c_sources() -> list[str]:
    """The data plane's modules written in C (each a `.c` beside the `.pyi` that types it), relative paths.

    `lb/http/_scan.c` (reading a head), `lb/http/_render.c` (writing one), `lb/ws/_plain.c` (a WebSocket
    handshake's heads that pass as they came), `lb/affinity/_token64.c` (an affinity token's text),
    `lb/_logwrite.c` (rendering and writing an access line), `lb/proxy/_coroutine.c` (a backend
    connect's step that ends without an exception), `lb/proxy/_reading.c` (a read copied out of the read
    buffer), `lb/state/_tally.c` (one added to a count) and `lb/affinity/_aead.c` (the token's AES-GCM, on
    OpenSSL contexts kept per key): each one's header comment says why it is C.
    """
    return sources("*.c")


def module_name(source: str) -> str:
    return source.removesuffix(".py").removesuffix(".c").replace("/", ".")


def remove_compiled(package: Path) -> int:
    """Delete the manifest first (a half-removed build is then refused, not run), then every extension
    module under `package`, for any interpreter; returns how many modules (the shared runtime aside)."""
    (package / MANIFEST).unlink(missing_ok=True)
    removed = 0
    for path in package.rglob("*.so"):
        path.unlink()
        removed += not path.name.startswith(SHARED_LIBRARY)
    for path in package.rglob("*.partial"):  # what a build killed between copy and rename left behind
        path.unlink()
    return removed


def check_toolchain() -> None:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        raise BuildProblem(f"no C compiler `{compiler}` (Debian: apt-get install gcc)")
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if not headers.exists():
        raise BuildProblem(f"no Python headers ({headers}; Debian: apt-get install python3-dev)")


def digests(root: Path) -> dict[str, str]:
    """module → SHA-256 of its source under `root` (the directory holding `lb`)."""
    return {module_name(source): source_digest(root / source) for source in sources() + c_sources()}


def _digests_or_none(root: Path) -> dict[str, str] | None:
    try:
        return digests(root)
    except FileNotFoundError:
        return None


def parallel_compile(compiler: Any, jobs: int) -> None:
    """Let `compiler` (a distutils CCompiler) compile one extension's C files `jobs` at a time.

    distutils compiles an extension's sources one after another. mypyc's `multi_file` build splits
    the group's runtime into a C file per module (one file would be one gcc run of about 50 s), so
    compiling them side by side halves the build on 2 cores. The body is distutils' own
    `CCompiler.compile`, with its loop run by a thread pool (each thread waits on one gcc).
    """

    def compile(
        sources: list[str], output_dir: str | None = None, macros: Any = None, include_dirs: Any = None,
        debug: bool = False, extra_preargs: Any = None, extra_postargs: Any = None, depends: Any = None,
    ) -> list[str]:
        macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs
        )
        cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)

        def one(obj: str) -> None:
            src, ext = build[obj]
            compiler._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, [obj for obj in objects if obj in build]))
        return list(objects)

    compiler.compile = compile


def compile_into(package: Path, jobs: int) -> int:
    """Compile `sources()` in a scratch directory, place the modules in `package`, write the manifest."""
    try:
        from mypyc.build import mypycify  # a dev dependency, needed only when compiling
        from setuptools import Extension, setup
        from setuptools.command.build_ext import build_ext
    except ImportError as exc:
        raise BuildProblem(f"{exc} (pip install -e '.[dev]': mypy and setuptools)") from exc

    compiled = digests(ROOT)  # before mypyc reads them: an edit made during the build is an edit after it
    if package != PACKAGE and _digests_or_none(package.parent) != compiled:
        raise BuildProblem(f"the sources in {package} are not this checkout's: compile that tree instead")
    with tempfile.TemporaryDirectory(prefix="lb-native-") as scratch:
        os.environ["MYPY_CACHE_DIR"] = str(Path(scratch, "mypy-cache"))
        os.chdir(ROOT)  # mypyc names modules by their path from here, and reads pyproject.toml's [tool.mypy]
        extensions = mypycify(sources(), opt_level="3", group_name=GROUP, target_dir=str(Path(scratch, "c")),
                              multi_file=jobs > 1)
        for extension in extensions:
            # mypyc writes the group's headers under the group's package (c/lb/), but its multi_file
            # sources include them by bare name: let the compiler look there.
            extension.include_dirs.append(str(Path(scratch, "c", *GROUP.split(".")[:-1])))
        extensions += [Extension(module_name(source), [source], extra_compile_args=["-Wall", "-Wextra"])
                       for source in c_sources()]
        built = Path(scratch, "lib")

        class BuildExt(build_ext):  # type: ignore[misc]  # setuptools is untyped here
            def build_extensions(self) -> None:
                parallel_compile(self.compiler, jobs)
                super().build_extensions()

        # setup() reads pyproject.toml from here too; its [tool.setuptools] table is for the package.
        warnings.filterwarnings("ignore", message=r"Support for `\[tool.setuptools\]`")
        setup(
            name="lb-native",
            ext_modules=extensions,
            cmdclass={"build_ext": BuildExt},
            script_args=["--quiet", "build_ext", "--build-lib", str(built), "--build-temp", str(Path(scratch, "o"))],
        )
        for extension_file in sorted(built.rglob(f"*{EXT_SUFFIX}")):
            target = package.parent / extension_file.relative_to(built)
            partial = target.with_name(target.name + ".partial")
            shutil.copyfile(extension_file, partial)
            os.replace(partial, target)  # never a half-written module, even for a process that has it mapped
    manifest = {"ext_suffix": EXT_SUFFIX, "modules": compiled,
                "written_in_c": sorted(module_name(source) for source in c_sources())}
    partial = package / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(partial, package / MANIFEST)  # last: until it exists the build is refused as unfinished
    return len(compiled)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--into", type=Path, default=PACKAGE, help="the `lb` package to put the modules in")
    parser.add_argument("--require", action="store_true", help="exit 1 unless the data plane was compiled")
    parser.add_argument("--remove", action="store_true", help="only remove the compiled modules (pure Python)")
    parser.add_argument("--stamp", type=Path, help="a file to touch when the build (or --remove) succeeded")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="C compilers at once")
    args = parser.parse_args(argv)
    package = args.into.resolve()
    if package.name != "lb" or not (package / "__init__.py").exists():
        parser.error(f"--into {package}: not an `lb` package")
    with open(package / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second make waits for the first, then builds over it
        removed = remove_compiled(package)
        if args.remove:
            print(f"build_native: removed {removed} compiled modules; the data plane is pure Python")
        else:
            try:
                check_toolchain()
                count = compile_into(package, max(1, args.jobs))
            except (Exception, SystemExit) as exc:  # BuildProblem, or a compiler's failure (SystemExit)
                remove_compiled(package)
                reason = str(exc) if isinstance(exc, BuildProblem) else f"compiling failed: {exc!r}"
                print(f"build_native: {reason}; the data plane stays pure Python "
                      "(same behaviour, more CPU per handshake)", file=sys.stderr)
                return 1 if args.require else 0
            print(f"build_native: {count} modules compiled into {package}")
    if args.stamp is not None:
        args.stamp.touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
