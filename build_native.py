"""Compile the data plane with mypyc: `python build_native.py [--into DIR] [--require | --remove]` (`make native`).

Why: a WebSocket handshake runs through the modules in `DATA_PLANE`, and in Python about two fifths
of its instructions were the interpreter itself (the bytecode loop, frame set-up, attribute
look-ups): `python -m bench.instructions --by-function 12`. mypyc compiles the same typed source
(`mypy --strict` already holds it) to C extension modules, with native classes and direct calls.
It is the compiler mypy and black ship with; we write no C, the tests run against the compiled
modules, and the `.py` files stay the pure-Python fallback for a machine without a C compiler.

What: the modules are compiled from this checkout and each extension module is placed next to its
source in `DIR` (default: this checkout's `lb`, which an editable install imports; the container
image passes its installed package). Python imports an extension module before a `.py` of the same
name. `lb.compiled` finds sources edited later, and `lb` refuses to run them stale.

Without a C compiler, or if compiling fails, the old extension modules are removed, the reason is
printed and the exit status is 0 (pure Python, slower per handshake, same behaviour); `--require`
makes that exit 1 (CI and the image want the compiled build or nothing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lb.compiled import GROUP, SHARED_LIBRARY

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "lb"
# Everything a connection runs through, accept to close; not config, control or admin, which run
# per reload or per request to the admin port.  lb/errors.py subclasses OSError, which a native
# class cannot, and is not per connection.
DATA_PLANE = ("lb/http", "lb/proxy", "lb/affinity", "lb/state", "lb/ws", "lb/log.py", "lb/access_log.py", "lb/tls.py")


def sources() -> list[str]:
    """The data plane's modules, as paths relative to the checkout."""
    found: list[str] = []
    for entry in DATA_PLANE:
        path = ROOT / entry
        files = sorted(path.glob("*.py")) if path.is_dir() else [path]
        found += [str(file.relative_to(ROOT)) for file in files if file.name != "__init__.py"]
    return found


def remove_compiled(package: Path) -> int:
    """Delete every extension module under `package` (a failed build must not leave old ones)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    removed = 0
    for path in package.rglob(f"*{suffix}"):
        path.unlink()
        removed += 1
    return removed


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
    """Compile `sources()` in a scratch directory and copy the extension modules into `package`."""
    from mypyc.build import mypycify  # imported here: a dev dependency, needed only when compiling
    from setuptools import setup
    from setuptools.command.build_ext import build_ext

    with tempfile.TemporaryDirectory(prefix="lb-native-") as scratch:
        os.environ["MYPY_CACHE_DIR"] = str(Path(scratch, "mypy-cache"))
        os.chdir(ROOT)  # mypyc names modules by their path from here, and reads pyproject.toml's [tool.mypy]
        modules = mypycify(sources(), opt_level="3", group_name=GROUP, target_dir=str(Path(scratch, "c")),
                           multi_file=jobs > 1)
        for extension in modules:
            # mypyc writes the group's headers under the group's package (c/lb/), but its multi_file
            # sources include them by bare name: let the compiler look there.
            extension.include_dirs.append(str(Path(scratch, "c", *GROUP.split(".")[:-1])))
        built = Path(scratch, "lib")
        # setup() reads pyproject.toml from here too; its [tool.setuptools] table is for the package.
        warnings.filterwarnings("ignore", message=r"Support for `\[tool.setuptools\]`")
        class BuildExt(build_ext):  # type: ignore[misc]  # setuptools is untyped here
            def build_extensions(self) -> None:
                parallel_compile(self.compiler, jobs)
                super().build_extensions()

        setup(
            name="lb-native",
            ext_modules=modules,
            cmdclass={"build_ext": BuildExt},
            script_args=["--quiet", "build_ext", "--build-lib", str(built), "--build-temp", str(Path(scratch, "o"))],
        )
        modules = 0
        for extension in built.rglob("*"):
            if extension.is_file():
                target = package.parent / extension.relative_to(built)
                shutil.copyfile(extension, target)  # a fresh mtime: newer than its source (lb.compiled)
                modules += not extension.name.startswith(SHARED_LIBRARY)
    return modules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--into", type=Path, default=PACKAGE, help="the `lb` package to put the modules in")
    parser.add_argument("--require", action="store_true", help="exit 1 unless the data plane was compiled")
    parser.add_argument("--remove", action="store_true", help="only remove the compiled modules (pure Python)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="C compilers in parallel")
    args = parser.parse_args(argv)
    package = args.into.resolve()
    if package.name != "lb" or not (package / "__init__.py").exists():
        parser.error(f"--into {package}: not an `lb` package")
    removed = remove_compiled(package)
    if args.remove:
        print(f"build_native: removed {removed} compiled modules; the data plane is pure Python")
        return 0
    problem = None
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        problem = "no C compiler (Debian: apt-get install gcc)"
    else:
        try:
            copied = compile_into(package, args.jobs)
        except (Exception, SystemExit) as exc:  # mypyc's type errors and a compiler's end in SystemExit
            remove_compiled(package)
            problem = f"compiling failed: {exc!r}"
    if problem is not None:
        print(f"build_native: {problem}; the data plane stays pure Python (same behaviour, more CPU per handshake)",
              file=sys.stderr)
        return 1 if args.require else 0
    print(f"build_native: {copied} modules compiled into {package}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
