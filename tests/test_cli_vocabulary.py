"""One vocabulary across commands: every command's --help walked, shared options checked."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

import epplan
from epplan.cli import app

runner = CliRunner()
ROOT = typer.main.get_command(app)

# Flags whose value is one of a fixed set: --help must list the values and completion offer them.
CHOICE_FLAGS = {"--placement": ("place",), "--solver": ("place",), "--overlap": ("place", "estimate", "run"),
                "--recompute": ("place", "estimate", "run"), "--optimizer-sharding": ("place", "estimate", "run"),
                "--device": ("run", "calibrate"), "--format": ("export",), "--fabric": ("topo gen",),
                "--node-type": ("topo gen", "topo import"), "--path-routing": ("topo show", "topo gen"),
                "--print-launch": ("run",), "--async-checkpoints": ("run",), "--allow-change": ("run",)}


def _commands(group=ROOT, path=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield " ".join((*path, name)), cmd


COMMANDS = dict(_commands())


def _options(cmd):
    return [p for p in cmd.params if getattr(p, "opts", None) and p.opts[0].startswith("-") and not p.hidden]


def test_every_help_reads_at_80_columns_without_type_noise():
    for path in ["", *COMMANDS]:
        result = runner.invoke(app, [*path.split(), "--help"], terminal_width=80, env={"COLUMNS": "80"})
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.output, path
        assert all(len(line) <= 80 for line in result.output.splitlines()), path


def test_shared_options_have_one_name_and_one_short_flag():
    spellings = defaultdict(set)
    for path, cmd in COMMANDS.items():
        for p in _options(cmd):
            long = max(p.opts, key=len)
            spellings[long].add(tuple(sorted(p.opts + p.secondary_opts)))
    assert {k: v for k, v in spellings.items() if len(v) > 1} == {}
    assert spellings["--out"] == {("--out", "-o")}
    shared = {"--topology", "--model", "--set", "--routing", "--placement", "--calibration", "--json", "--out",
              "--achievable-tflops", "--peak-tflops", "--micro-batches", "--recompute", "--optimizer-sharding",
              "--overlap", "--num-chunks", "--experts-per-gpu", "--memory-gb", "--seed", "--device"}
    assert shared <= set(spellings)


def test_choices_are_listed_in_help_and_offered_to_completion():
    for flag, paths in CHOICE_FLAGS.items():
        for path in paths:
            (param,) = [p for p in _options(COMMANDS[path]) if flag in p.opts]
            ctx = COMMANDS[path].make_context(path, [], resilient_parsing=True)
            offered = [item.value for item in param.shell_complete(ctx, "")]
            assert len(offered) >= 2, (path, flag)
            help_text = runner.invoke(app, [*path.split(), "--help"], env={"COLUMNS": "200"}).output
            assert "|".join(offered) in help_text, (path, flag, offered)


def test_completion_offers_a_flags_choices_through_the_shell_protocol():
    result = runner.invoke(app, [], prog_name="epplan", env={
        "_EPPLAN_COMPLETE": "complete_bash", "COMP_WORDS": "epplan place --overlap ", "COMP_CWORD": "3"})
    assert result.exit_code == 0 and result.output.split() == ["auto", "on", "off"], result.output
    shown = runner.invoke(app, ["--show-completion", "bash"], prog_name="epplan")
    assert shown.exit_code == 0 and "_EPPLAN_COMPLETE=complete_bash" in shown.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"epplan {epplan.__version__}"


def test_help_states_the_exit_codes():
    text = " ".join(runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output.split())
    for code in ("1 bad input", "3 no run settings fit", "4 the time limit ended the solve"):
        assert code in text


@pytest.mark.parametrize("args", [["--placement", "nope"], ["--solver", "nope"], ["--overlap", "sideways"],
                                  ["--no-such-flag"]])
def test_a_value_outside_the_choices_is_one_line_and_exit_1(args):
    result = runner.invoke(app, ["place", "--topology", "t.yaml", *args])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("error: ") and "place --help" in result.stderr


TOPOLOGY_FILE = str(Path(__file__).resolve().parent.parent / "topologies" / "dgx-h100-2node.yaml")


@pytest.mark.parametrize("cmd, old, new", [
    (["topo", "gen", "--nodes", "2"], ["--fabric", "three-tier"], ["--fabric", "three_tier"]),
    (["topo", "gen", "--nodes", "2"], ["--fabric", "rail"], ["--fabric", "rail_optimized"]),
    (["topo", "gen", "--nodes", "2"], ["--routing", "rail_aligned"], ["--path-routing", "rail_aligned"]),
    (["topo", "show", TOPOLOGY_FILE], ["--routing", "rail_aligned"], ["--path-routing", "rail_aligned"]),
])
def test_old_spellings_still_work_with_a_deprecation_line(cmd, old, new):
    before, after = runner.invoke(app, cmd + old), runner.invoke(app, cmd + new)
    assert before.exit_code == after.exit_code == 0, before.output
    assert before.stdout == after.stdout
    deprecated = f"{old[0]} {old[1]}" if old[0] == "--fabric" else old[0]
    assert before.stderr.startswith(f"warning: {deprecated} is deprecated") and after.stderr == ""


def test_routing_is_the_token_routing_in_every_command():
    # The fabric's path routing (ecmp, rail_aligned) is --path-routing; --routing is always a
    # routing spec (zipf:1.2, a trace, a run's statistics).
    for path, cmd in COMMANDS.items():
        for p in _options(cmd):
            if "--routing" in p.opts:
                assert p.metavar == "SPEC", path


TWO_NODES = str(Path(__file__).resolve().parent.parent / "topologies" / "dgx-h100-2node.yaml")
SMALL = ["--topology", TWO_NODES, "--model", "tiny", "--set", "num_experts=16"]


@pytest.mark.parametrize("old, new", [
    (["estimate", *SMALL, "--tflops", "100", "--json"], ["estimate", *SMALL, "--achievable-tflops", "100", "--json"]),
    (["estimate", *SMALL, "--layers"], ["estimate", *SMALL, "--per-layer"]),
])
def test_old_flags_still_work_with_a_deprecation_line(old, new):
    before, after = runner.invoke(app, old), runner.invoke(app, new)
    assert before.exit_code == after.exit_code == 0, before.output
    assert before.stdout == after.stdout and after.stderr == ""
    flag = next(a for a in old if a not in new)
    assert before.stderr == f"warning: {flag} is deprecated and goes in the next release: use {new[old.index(flag)]}\n"


def test_place_method_is_the_old_spelling_of_placement(tmp_path):
    args = ["place", *SMALL, "--set", "num_layers=2", "--json"]
    before = runner.invoke(app, [*args, "--method", "eplb", "--out", str(tmp_path / "a.json")])
    after = runner.invoke(app, [*args, "--placement", "eplb", "--out", str(tmp_path / "b.json")])
    assert before.exit_code == after.exit_code == 0, before.output
    assert "--method is deprecated" in before.stderr and after.stderr == ""
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_every_json_names_its_format_and_version(tmp_path):
    plan = tmp_path / "plan.json"
    outputs = {
        "place": runner.invoke(app, ["place", *SMALL, "--set", "num_layers=2", "--placement", "eplb", "--json",
                                     "--out", str(plan)]),
        "estimate": runner.invoke(app, ["estimate", *SMALL, "--json"]),
        "topo show": runner.invoke(app, ["topo", "show", TWO_NODES, "--json"]),
    }
    outputs["report"] = runner.invoke(app, ["report", str(plan), "--json"])
    outputs["export"] = runner.invoke(app, ["export", str(plan), "--format", "json", "--json",
                                            "--out", str(tmp_path / "x.json")])
    documented = (Path(__file__).resolve().parent.parent / "docs" / "json.md").read_text()
    for command, result in outputs.items():
        assert result.exit_code == 0, (command, result.output)
        data = json.loads(result.stdout)
        assert isinstance(data["format"], str) and data["version"] == 1, command
        assert f'"format": "{data["format"]}"' in documented, command


def test_default_tables_fit_80_columns_without_cut_cells(tmp_path):
    plan = tmp_path / "plan.json"
    env = {"COLUMNS": "80"}
    outputs = [
        runner.invoke(app, ["place", *SMALL, "--set", "num_layers=2", "--routing", "zipf:1.2", "--compare-all",
                            "--time-limit", "20", "--out", str(plan)], env=env),
        runner.invoke(app, ["estimate", *SMALL, "--per-layer", "--peak-tflops", "400"], env=env),
    ]
    outputs.append(runner.invoke(app, ["report", str(plan), "--compare", "eplb"], env=env))
    for result in outputs:
        assert result.exit_code in (0, 4), result.output
        assert "…" not in result.stdout, result.stdout
        assert all(len(line) <= 80 for line in result.stdout.splitlines()), result.stdout
    place_out, estimate_out = outputs[0].stdout, outputs[1].stdout
    assert "set by" in place_out and "busiest link" in place_out
    assert not any(key in place_out for key in ("gap_met", "gap_open", "time_limit", "binds"))
    assert "MFU, datasheet peak" in estimate_out and "MFU, 400 TFLOP/s peak" in estimate_out


# ------------------------------------------------------------------------------ library words, CLI flags

def test_the_library_names_its_parameters_and_the_cli_its_flags(tmp_path):
    from epplan.errors import PlacementError
    from epplan.placement.problem import PlacementProblem
    from epplan.topology import load_topology
    from epplan.workload import load_model_config, make_traffic

    config = load_model_config("tiny", {"num_experts": 40})
    topo = load_topology(TWO_NODES)
    with pytest.raises(PlacementError) as exc:
        PlacementProblem(topo, config, make_traffic("uniform", config, topo.num_gpus))
    assert "experts_per_gpu=3" in str(exc.value) and "--" not in str(exc.value)
    assert "--experts-per-gpu 3" in exc.value.cli_message()
    result = runner.invoke(app, ["place", "--topology", TWO_NODES, "--model", "tiny", "--set", "num_experts=40",
                                 "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 1 and "--experts-per-gpu 3 (or more)" in result.stderr


def test_no_library_error_is_worded_as_a_flag():
    # Outside the CLI, and in the run command's launcher and workers (train/) too, an error names
    # the parameter through epplan.errors.param; a literal "--flag" in a raised message is the CLI's
    # word (a whole command to run, 'epplan calibrate --out FILE', is quoted as the user types it).
    # An f-string is read whole, its values as X, so that a quoted command may hold a value.
    import ast
    import re

    root = Path(__file__).resolve().parent.parent / "epplan"
    flag = re.compile(r"(^|[\s(])--[a-z]")

    def texts(node: ast.AST) -> list[str]:
        if isinstance(node, ast.JoinedStr):
            return ["".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)]
        if isinstance(node, ast.Constant):
            return [node.value] if isinstance(node.value, str) else []
        return [t for child in ast.iter_child_nodes(node) for t in texts(child)]

    found = []
    for path in sorted(root.rglob("*.py")):
        if path.parent.name == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                if any(flag.search(re.sub(r"'epplan [^']*'", "", t)) for t in texts(node.exc)):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found == []
