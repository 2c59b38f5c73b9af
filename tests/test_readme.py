"""README.md's examples run as written at 80 columns (scripts/readme_examples.py runs them all)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("readme_examples", ROOT / "scripts" / "readme_examples.py")
readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme)


def test_every_readme_command_is_run_or_named_as_skipped():
    commands = [c for block in readme.readme_commands((ROOT / "README.md").read_text()) for c in block]
    assert len(commands) >= 30
    for command in commands:
        assert command.startswith(("epplan ", "python -c ", *readme.SKIP)), command
    # A continued line is one command: the place of the first example, with its --out.
    assert any(c.startswith("epplan place --topology topologies/h100-16node-rail.yaml") and "--out plan.json" in c
               for c in commands)


def test_a_cut_cell_or_a_wide_line_fails_only_where_tables_must_fit():
    table = "layer  MoE ms\n    0   1.23\n"
    assert readme.problems("epplan place --topology t.yaml", 0, table) == []
    assert readme.problems("epplan place --topology t.yaml", 0, "bottl… 1.2\n") == ["a cell cut to '…'"]
    wide = "x" * 81 + "\n"
    assert readme.problems("epplan report plan.json", 0, wide)[0].startswith("1 line(s) wider than 80")
    assert readme.problems("epplan report plan.json --json", 0, wide) == []  # JSON is not a table
    assert readme.problems("epplan run tiny.json", 0, wide) == []             # a log, not a table
    assert readme.problems("epplan topo show t.yaml", 2, "") == ["exit code 2"]


@pytest.mark.slow
def test_the_topology_and_estimate_examples_run_at_80_columns(tmp_path, capsys):
    code = readme.main(["--only", "epplan topo gen", "--only", "epplan topo show",
                        "--only", "epplan estimate --topology topologies/dgx-h100-2node.yaml --model seed",
                        "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("\nok ") + out.startswith("ok ") >= 5, out   # two estimates, gen, two shows
