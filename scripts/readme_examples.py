"""Run README.md's examples as written, at 80 columns, and say which failed or did not fit.

Every ```bash block of README.md runs in order, one command a line (a trailing backslash
continues it), in a scratch directory that links the repository's topologies/, examples/ and
scripts/, with COLUMNS=80. A command fails if it exits non-zero; the default (table) output of
``epplan place``, ``estimate`` and ``report`` fails if a cell is cut to "…" or a line is wider than
80 columns. ``pip install`` and ``tensorboard`` lines are not run (they install, or open a viewer).

    python scripts/readme_examples.py                 # all of them (about 10 minutes on 2 cores)
    python scripts/readme_examples.py --only "epplan topo" --only "epplan estimate --topology"

Exits 1 if any command failed; prints one line per command (exit code, seconds, widest line).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = ("pip ", "tensorboard ")  # installing, and a viewer that does not exit
CHECKED = re.compile(r"^epplan (place|estimate|report)\b")  # tables that must read at 80 columns
COLUMNS = 80


def readme_commands(text: str) -> list[list[str]]:
    """The README's bash blocks, each a list of commands (continuation lines joined)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
    return [[line for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()] for block in blocks]


def problems(command: str, returncode: int, stdout: str) -> list[str]:
    """What is wrong with one command's run: its exit code, and for place, estimate and report
    without --json/--csv/--markdown a cut cell or a line wider than COLUMNS."""
    out = [] if returncode == 0 else [f"exit code {returncode}"]
    if CHECKED.match(command) and not re.search(r"--(json|csv|markdown)\b", command):
        if "…" in stdout:
            out.append("a cell cut to '…'")
        wide = [line for line in stdout.splitlines() if len(line) > COLUMNS]
        if wide:
            out.append(f"{len(wide)} line(s) wider than {COLUMNS} columns, e.g. {wide[0][:100]!r}")
    return out


def run(commands: list[str], workdir: Path) -> int:
    for name in ("topologies", "examples", "scripts"):
        if not (workdir / name).exists():
            (workdir / name).symlink_to(ROOT / name)
    env = dict(os.environ, COLUMNS=str(COLUMNS))
    failed = 0
    for command in commands:
        if command.startswith(SKIP):
            print(f"skip            {command}", flush=True)
            continue
        start = time.monotonic()
        result = subprocess.run(command, shell=True, cwd=workdir, env=env, capture_output=True, text=True)
        seconds = time.monotonic() - start
        found = problems(command, result.returncode, result.stdout)
        width = max((len(line) for line in result.stdout.splitlines()), default=0)
        print(f"{'FAIL' if found else 'ok':4} {seconds:6.1f} s w{width:<3} {command}", flush=True)
        for what in found:
            print(f"     {what}", flush=True)
        if found:
            failed += 1
            print(result.stdout[-2000:], result.stderr[-2000:], sep="\n", flush=True)
    print(f"{failed} failed", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="PREFIX",
                        help="Run only the blocks whose every command starts with one of these prefixes.")
    parser.add_argument("--dir", type=Path, help="Scratch directory (default: a new temporary one).")
    args = parser.parse_args(argv)
    blocks = readme_commands((ROOT / "README.md").read_text())
    if args.only:
        blocks = [b for b in blocks if all(c.startswith(tuple(args.only)) for c in b)]
    commands = [c for block in blocks for c in block]
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        return run(commands, args.dir)
    with tempfile.TemporaryDirectory(prefix="epplan-readme-") as tmp:
        return run(commands, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
