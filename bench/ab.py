"""Two trees side by side: `python -m bench.ab REV [--rounds N] [--window S] [--check] [--old-python PY]`.

CPU per handshake of the balancer at git revision REV ("old") and of this checkout ("new"),
with HAProxy (when installed) and the floor, in alternating windows of one run: the comparison a
change needs when the machine's speed moves 10-30 % between runs (every target moves with it,
so only ratios taken within a round compare).  REV is checked out in a temporary git worktree
and its data plane compiled there (`build_native.py --require`), then removed.  Prints each
round's µs per handshake and the medians of the per-round ratios new/old, new/haproxy and
old/haproxy (and the floor's).  The balancers run the benchmark's configuration
(bench.runner.balancer_config), on CPU 0; everything else on CPU 1, as `python -m bench`.

`--old-python PY` compiles and runs the old tree with another interpreter: the python of a venv that
has the dependencies (`make setup PYTHON=...` in another checkout makes one).  With REV
`HEAD` that compares two interpreters on the same code: what `deploy/Containerfile`'s choice of base
rests on.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench import procs, runner
from bench.haproxy import find_haproxy
from bench.procs import HOST, BenchError, Child
from bench.runner import FLOOR, HAPROXY, Plan, Run, Target

ROOT = Path(__file__).resolve().parents[1]
OLD, NEW = "old", "new"


def paired_ratios(costs: Mapping[str, Sequence[float]], top: str, bottom: str) -> float | None:
    """The median of the per-round ratios top/bottom (rounds where both were measured), or None."""
    ratios = [a / b for a, b in zip(costs.get(top, ()), costs.get(bottom, ()), strict=False) if a > 0 and b > 0]
    return statistics.median(ratios) if ratios else None


def _worktree(rev: str, into: Path, python: str) -> Path:
    """`rev` checked out at `into` with its data plane compiled by `python`; raises BenchError with git's or the
    build's words."""
    done = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), rev],
                          capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise BenchError(f"git worktree add {rev}: {done.stderr.strip()}")
    built = subprocess.run([python, "build_native.py", "--require"], cwd=into,
                           capture_output=True, text=True, timeout=600, check=False)
    if built.returncode != 0:
        raise BenchError(f"build_native.py at {rev}: {(built.stdout + built.stderr).strip()[-2000:]}")
    return into


def _start_tree(run: Run, children: list[Child], name: str, tree: Path, python: str) -> Target:
    """A balancer running the sources and build at `tree` (PYTHONPATH first, then its own folder) on `python`."""
    path, port, admin_port = runner._write_config(run, name, None)
    env = procs.child_env()
    env["PYTHONPATH"] = str(tree)
    command = ["taskset", "-c", run.pinning.proxy] if run.pinning.proxy is not None else []
    command += [python, "-m", "lb", "run", "--config", str(path)]
    log_path = run.log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=tree,
                                start_new_session=True)
    child = Child(name, proc, log_path)
    children.append(child)
    runner._wait_ready(child, (HOST, port), admin_port)
    return Target(name, ((HOST, port),), child)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the git revision to compare this checkout with (say HEAD~3 or a tag)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    parser.add_argument("--window", type=float, default=5.0, help="seconds measured per target and round")
    parser.add_argument("--check", action="store_true", help="send the issued cookie back (check, not issue)")
    parser.add_argument("--old-python", default=sys.executable, metavar="PY",
                        help="the interpreter that compiles and runs the old tree (default: this one)")
    args = parser.parse_args(argv)
    plan = Plan.make(False)
    procs.raise_nofile()
    with tempfile.TemporaryDirectory(prefix="lb-ab-") as tmp:
        run = Run(plan, procs.choose_pinning(True), Path(tmp))
        children: list[Child] = []
        tree = Path(tmp) / "old"
        try:
            _worktree(args.rev, tree, args.old_python)
            runner._start_backends(run, children)
            targets = [_start_tree(run, children, OLD, tree, args.old_python),
                       _start_tree(run, children, NEW, ROOT, sys.executable)]
            haproxy = find_haproxy()
            if haproxy is not None:
                targets.append(runner._start_haproxy(run, children, haproxy))
            targets.append(runner._start_floor(run, children))
            costs: dict[str, list[float]] = {target.name: [] for target in targets}
            for round_index in range(max(1, args.rounds)):
                for target in targets if round_index % 2 == 0 else targets[::-1]:
                    spec = runner.handshake_spec(plan, target, args.window, args.check)
                    result = runner._loadgen(run, spec, run.pinning.load, args.window + 60, target.name)
                    costs[target.name].append(runner.cpu_per_unit_us(result))
                    time.sleep(0.3)
                print(f"round {round_index + 1}: " + "  ".join(f"{name} {values[-1]:.0f} µs"
                                                             for name, values in costs.items()), flush=True)
        except BenchError as exc:
            print(f"a/b failed: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all(children)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           capture_output=True, timeout=60, check=False)
    kind = "check" if args.check else "issue"
    print(f"\nCPU per handshake ({kind} a cookie), medians of {args.rounds} rounds: " + "  ".join(
        f"{name} {statistics.median(values):.0f} µs" for name, values in costs.items()))
    for top, bottom in ((NEW, OLD), (NEW, HAPROXY), (OLD, HAPROXY), (NEW, FLOOR), (OLD, FLOOR)):
        ratio = paired_ratios(costs, top, bottom)
        if ratio is not None:
            print(f"{top}/{bottom}: {ratio:.3f} (median of per-round ratios)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
