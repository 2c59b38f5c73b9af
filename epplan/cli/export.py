"""``epplan export``: a manifest's placement in the layout another framework consumes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from epplan.cli import app
from epplan.cli.common import FLAGS, JsonOption, choices, console, count, out_option, plain, print_json, user_errors
from epplan.cost import evaluate
from epplan.errors import EpplanError, PlacementError
from epplan.export import dispatch_placement, eplb_maps, megatron_expert_order, physical_layout
from epplan.fileio import atomic_write_text
from epplan.manifest import build_manifest, load_manifest, write_manifest

FORMATS = ("eplb", "vllm", "sglang", "megatron", "json")
_SUFFIX = {"eplb": ".json", "vllm": ".pt", "sglang": ".json", "megatron": ".json", "json": ".json"}
ExportFormat = choices("ExportFormat", FORMATS)
_DISPATCH = {"eplb": "even", "vllm": "even", "sglang": "local_first"}


@app.command("export", no_args_is_help=True, epilog=(
    "Examples:\n\n"
    "  epplan export plan.json --format sglang --out expert-location.json\n\n"
    "  epplan export plan.json --format vllm --out eplb-state.pt\n\n"
    "  epplan export plan.json --format megatron --out expert-order.json"))
@user_errors
def export(
    plan: Annotated[Path, typer.Argument(metavar="PLAN", help="Placement manifest written by 'epplan place'.", show_default=False)],
    format: Annotated[ExportFormat, typer.Option("--format", callback=plain, help="Target framework.",
                                                 show_default=False)],
    out: Annotated[Optional[Path], out_option("File to write [default: PLAN's name + the target].")] = None,
    topology: Annotated[Optional[Path], typer.Option(
        help="The plan's topology file, if its recorded path is not there (to score the export).",
        show_default=False)] = None,
    json_: JsonOption = False,
) -> None:
    """Write a plan in the layout EPLB, vLLM, SGLang or Megatron-Core reads.

    Write the plan as EPLB's phy2log/log2phy/logcnt (eplb), vLLM's EplbState maps (vllm),
    SGLang's --init-expert-location file (sglang), Megatron-Core's expert order (megatron) or
    plain JSON with every split (json). Targets that cannot express per-source splits also get an
    epplan manifest of what they will run, scored beside the original."""
    manifest = load_manifest(plan)
    placement, config = manifest.placement, manifest.config
    out = out or plan.with_name(f"{plan.stem}.{format}{_SUFFIX[format]}")
    info: dict[str, Any] = {"plan": str(plan), "target": format, "out": str(out), "notes": []}
    notes: list[str] = info["notes"]

    if format == "json":
        _write_json(out, _plain_doc(manifest))
    elif format == "megatron":
        order = megatron_expert_order(placement)
        _write_json(out, {
            "format": "epplan.megatron-expert-order", "expert_model_parallel_size": placement.num_ranks,
            "num_moe_experts": placement.num_experts,
            "num_local_experts": placement.num_experts // placement.num_ranks,
            "moe_layers": list(range(config.num_dense_layers, config.num_layers)),
            "expert_order": order.tolist()})
        notes.append("exact: Megatron-Core runs this plan once the checkpoint's experts and router rows are "
                     "permuted by expert_order (global expert q <- logical expert expert_order[l][q])")
    else:
        load = np.asarray(manifest.doc["routing"]["expert_load"], dtype=np.float64)
        layout = physical_layout(placement, load)
        log2phy, logcnt = eplb_maps(layout.phy2log, placement.num_experts)
        redundant = layout.num_physical - placement.num_experts
        info.update(num_physical_experts=layout.num_physical, slots_per_gpu=layout.slots,
                    num_redundant_experts=redundant)
        if format == "eplb":
            _write_json(out, {"phy2log": layout.phy2log.tolist(), "log2phy": log2phy.tolist(),
                              "logcnt": logcnt.tolist(), "num_gpus": placement.num_ranks,
                              "num_replicas": layout.num_physical})
        elif format == "vllm":
            import torch

            _write_torch(out, {"physical_to_logical_map": torch.from_numpy(layout.phy2log),
                               "logical_to_physical_map": torch.from_numpy(log2phy),
                               "logical_replica_count": torch.from_numpy(logcnt)})
        else:  # sglang: one row per decoder layer; dense layers take the trivial mapping
            dense = np.arange(layout.num_physical)[None, :].repeat(config.num_dense_layers, 0) % placement.num_experts
            _write_json(out, {"physical_to_logical_map": np.concatenate([dense, layout.phy2log]).tolist()})
            info["flags"] = (f"--ep-size {placement.num_ranks} --ep-num-redundant-experts {redundant} "
                             f"--init-expert-location {out}")
        if layout.padded:
            notes.append(f"every GPU needs {count(layout.slots, 'physical expert')}: {count(len(layout.padded), 'free slot')} "
                         "filled with extra replicas of the most loaded experts they lacked")
        how = ("each rank's tokens go to the replica on that rank if there is one, else to one replica "
               "(replicas balanced by ranks served)" if _DISPATCH[format] == "local_first"
               else "each expert's tokens are spread evenly over its replicas")
        notes.append(f"per-source splits are lost: {format} cannot express them; {how}")
        exported = dispatch_placement(layout.phy2log, placement.num_ranks, placement.num_experts,
                                      _DISPATCH[format], method=f"{manifest.placement.method}->{format}")
        info.update(_score(plan, topology, manifest, exported, out, notes))

    if json_:
        print_json(info, "export")
        return
    console.print(f"wrote [bold]{out}[/] ({format})", highlight=False)
    for note in notes:
        console.print(f"  [dim]note: {note}[/]", highlight=False)
    if "scored_manifest" in info:
        console.print(f"  MoE layers' time per step (the planner's objective): original "
                      f"{info['original_objective_s']:.4g} s, as {format} runs it {info['exported_objective_s']:.4g} s; "
                      f"step {info['original_step_time_s']:.4g} s vs {info['exported_step_time_s']:.4g} s; "
                      f"manifest of the exported plan: {info['scored_manifest']} "
                      f"(epplan report {plan} --compare {info['scored_manifest']})", highlight=False)
    if "flags" in info:
        console.print(f"  SGLang flags: {info['flags']}", highlight=False)


def _score(plan: Path, topology: Path | None, manifest, exported, out: Path, notes: list[str]) -> dict:
    """Score the exported placement with the plan's problem and write its manifest beside ``out``."""
    from epplan.opened import open_manifest

    try:
        problem = open_manifest(manifest, topology, what="--topology").problem
    except EpplanError as exc:
        notes.append(f"not scored: {exc.cli_message(FLAGS)}")
        return {}
    cost = evaluate(exported, problem)
    routing = manifest.doc["routing"]
    doc = build_manifest(exported, problem, cost=cost, routing_spec=routing.get("spec"),
                         routing_seed=routing.get("seed"))
    path = out.with_name(f"{out.stem}.manifest.json")
    write_manifest(path, doc)
    original = evaluate(manifest.placement, problem)
    return {"scored_manifest": str(path), "original_objective_s": original.objective_s,
            "exported_objective_s": cost.objective_s, "original_step_time_s": original.step_time_s,
            "exported_step_time_s": cost.step_time_s}


def _plain_doc(manifest) -> dict[str, Any]:
    p = manifest.placement
    return {
        "format": "epplan.placement", "model": manifest.config.name, "num_ranks": p.num_ranks,
        "num_experts": p.num_experts, "moe_layers": list(range(manifest.config.num_dense_layers,
                                                               manifest.config.num_layers)),
        "layers": [{"rank_experts": layer.experts_on_rank(p.num_ranks),
                    "experts": [{"replicas": r.tolist(), "split": s.tolist()}
                                for r, s in zip(layer.replicas, layer.split)]} for layer in p.layers],
    }


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    try:
        atomic_write_text(path, json.dumps(doc) + "\n")
    except OSError as exc:
        raise PlacementError(f"--out {path}: cannot write: {exc.strerror or exc}") from None


def _write_torch(path: Path, obj: dict[str, Any]) -> None:
    import torch

    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.replace(tmp, path)
    except OSError as exc:
        raise PlacementError(f"--out {path}: cannot write: {exc.strerror or exc}") from None
