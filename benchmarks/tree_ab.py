"""A/B of a kernel or step change: run one benchmark command under each source tree in turn and print every run's
output under its tree's name, so the commit before a change and after it are timed by one command in one device call
on one card (serve_ab.py does the same for a served workload).

    PYTHONPATH=src:. python3 benchmarks/tree_ab.py --tree before=/tmp/old/src --tree after=src --rounds 2 \\
        --grep "^\\| 27B" -- benchmarks/bench_attention.py --kv-quant

Each run is `python SCRIPT ARGS` (or `python -m MODULE ARGS`) from the repository root with the tree first on
PYTHONPATH, then the repository root (the `benchmarks` package) and what PYTHONPATH held. Every run reports which
deltaserve package it imported: a script that puts another source directory first on sys.path would time that one,
so such a run is flagged and the command exits non-zero. --rounds 2 runs the trees in order, then in reverse, so
that first-use costs (Triton compiles, autotuning) fall on each tree once; --grep keeps the output lines that match
a regular expression (a table's rows), --log-dir keeps every run's whole output.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import parse_tree, table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_MARK = "tree_ab: deltaserve imported from "
# runs the command as `python SCRIPT ...` / `python -m MODULE ...` would, then says which deltaserve it imported
_BOOT = f"""import atexit, os, runpy, sys
def _say():
    m = sys.modules.get("deltaserve")
    print("{_MARK}" + (getattr(m, "__file__", None) or "(not imported)"), flush=True)
atexit.register(_say)
if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_once(tree: Path, command: list[str], timeout: float) -> tuple[int, str, float, str]:
    """(exit status, output, seconds, the deltaserve package the run imported)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(ROOT), *filter(None, [os.environ.get(
        "PYTHONPATH")])]))
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", _BOOT, *command], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                               for x in (e.stdout, e.stderr)) + f"\n(stopped after {timeout:.0f} s)"
    imported = next((line[len(_MARK):] for line in out.splitlines() if line.startswith(_MARK)), "(not reported)")
    return rc, out, time.perf_counter() - start, imported


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=parse_tree, action="append", required=True, metavar="NAME=PATH",
                    help="a source directory holding the deltaserve package (repeat: one per tree)")
    ap.add_argument("--rounds", type=int, choices=(1, 2), default=1,
                    help="2: the trees in order, then in reverse")
    ap.add_argument("--grep", default=None, help="print only the output lines matching this regular expression")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--log-dir", default=None, help="write every run's whole output here")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...] or -- -m MODULE [ARGS...]")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    names = [n for n, _ in args.tree]
    if len(set(names)) != len(names):
        ap.error(f"--tree names must differ, got {names}")
    if not command or (command[0] == "-m" and len(command) < 2):
        ap.error("give the command after --: a script (benchmarks/bench_attention.py --kv-quant) or -m MODULE")
    if command[0] != "-m" and not (ROOT / command[0]).is_file() and not Path(command[0]).is_file():
        ap.error(f"{command[0]} is not a file (scripts are run from the repository root, {ROOT})")
    try:
        grep = re.compile(args.grep) if args.grep else None
    except re.error as e:
        ap.error(f"--grep {args.grep!r} is not a regular expression: {e}")
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    order = list(args.tree) + (list(reversed(args.tree)) if args.rounds == 2 else [])
    runs = []
    for i, (name, tree) in enumerate(order):
        rc, out, seconds, imported = run_once(tree, command, args.timeout)
        own = Path(imported).resolve().is_relative_to(tree) if imported.startswith("/") else False
        print(f"== run {i}: {name} ({tree}), exit {rc}, {seconds:.1f} s"
              + ("" if own else f"; DID NOT RUN THE TREE'S deltaserve (imported: {imported})"), flush=True)
        lines = [line for line in out.splitlines() if not line.startswith(_MARK)]
        print("\n".join(line for line in lines if grep is None or grep.search(line)), flush=True)
        if log_dir:
            (log_dir / f"run_{i}_{name}.log").write_text(out)
        runs.append({"run": i, "tree": name, "exit": rc, "seconds": round(seconds, 1), "own deltaserve": own})
    print(table(runs))
    if not all(r["exit"] == 0 and r["own deltaserve"] for r in runs):
        raise SystemExit(1)
    return runs


if __name__ == "__main__":
    main()
