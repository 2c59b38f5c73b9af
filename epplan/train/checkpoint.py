"""Checkpoints that survive crashes and re-placement.

Layout of one checkpoint, ``OUT/checkpoints/step_00000040/``::

    meta.json        format, step, manifest hash, model, files and their sizes, expert owners,
                     data position, run extras (written last)
    dense.pt         rank 0: every non-expert tensor of the model's state_dict (attention, norms,
                     embeddings, routers and their selection biases) and its optimizer state
    rank00003.pt     rank 3: the experts it owns (lowest replica), one entry per (layer, expert),
                     with their optimizer state; its RNG states

Experts are stored by *logical* id (``layers.1.ffn.experts.w1[5]``), never by slot on a rank, so
a checkpoint does not depend on the placement that wrote it: resuming under another placement
(``epplan place`` again, from the run's routing statistics) loads each rank's new experts from
whichever files hold them, with their AdamW moments. Each rank reads only the entries it needs
(memory-mapped ``torch.load``).

Atomicity: everything is written into ``.step_00000040.tmp/``; after every rank has written and
synced its file, rank 0 writes ``meta.json`` (with each file's size) and renames the directory.
A crash at any point leaves either no ``step_*`` directory or a complete one; ``latest`` ignores
directories whose meta or files are missing or short. ``--out`` must be on a filesystem that all
nodes share.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from epplan.errors import EpplanError
from epplan.runtime.expert_parallel import ExpertParallelExperts

FORMAT = "epplan.checkpoint"
VERSION = 1
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(EpplanError):
    """A checkpoint cannot be written, or does not fit the run that wants to load it."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    meta: dict


def _expert_modules(model: nn.Module) -> list[tuple[str, ExpertParallelExperts]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)]


def _expert_params(model: nn.Module) -> dict[str, tuple[ExpertParallelExperts, nn.Parameter]]:
    """'layers.1.ffn.experts.w1' -> (its module, the (E_loc, ...) parameter)."""
    return {f"{name}.{wname}": (m, w) for name, m in _expert_modules(model)
            for wname, w in m.named_parameters(recurse=False)}


def _slice_state(state: dict, j: int) -> dict:
    """Optimizer state of local slot j: per-element tensors sliced, scalars (``step``) kept."""
    return {k: v[j].clone() if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in state.items()}


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, *, rank: int,
         meta: dict, dense_extra: dict, keep: int) -> Path:
    """Write checkpoint ``step`` under ``root`` (collective). Returns its directory.

    meta: JSON-able facts for ``meta.json`` (manifest hash, model, data position, ...).
    dense_extra: tensors/objects rank 0 stores next to the dense state (e.g. routing counts).
    keep: checkpoints to keep, newest first (older ones are deleted after this one is complete).
    """
    tmp, final = root / f".step_{step:08d}.tmp", root / f"step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written one from a crashed attempt
        tmp.mkdir(parents=True)
    dist.barrier()
    if not tmp.is_dir():
        raise CheckpointError(f"rank {rank} cannot see {tmp}, which rank 0 created: --out must be on "
                              "a filesystem shared by all nodes")

    experts = _expert_params(model)
    state_dict = model.state_dict()
    own_model, own_optim = {}, {}
    for key, (module, w) in experts.items():
        opt_state = optimizer.state.get(w, {})
        for j, e in enumerate(module.local_experts):
            if module.owner[e] == rank:
                own_model[f"{key}[{e}]"] = w.detach()[j].clone()
                own_optim[f"{key}[{e}]"] = _slice_state(opt_state, j)
    _save_synced({"model": own_model, "optim": own_optim, "rng": rng_state()}, tmp / f"rank{rank:05d}.pt")
    if rank == 0:
        names = {id(p): n for n, p in model.named_parameters()}
        dense = {k: v for k, v in state_dict.items() if k not in experts}
        dense_optim = {names[id(p)]: s for p, s in optimizer.state.items() if names[id(p)] not in experts}
        _save_synced({"model": dense, "optim": dense_optim, "extra": dense_extra}, tmp / "dense.pt")
    dist.barrier()

    if rank == 0:
        owners = {name: [int(o) for o in m.owner] for name, m in _expert_modules(model)}
        files = {p.name: p.stat().st_size for p in sorted(tmp.glob("*.pt"))}
        doc = {"format": FORMAT, "version": VERSION, "step": step, "time": time.time(),
               "num_ranks": dist.get_world_size(), **meta, "expert_owners": owners, "files": files}
        with open(tmp / "meta.json", "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # the same step again (a restarted attempt got here before): replace it
            old = root / f".step_{step:08d}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_dir(root)
        for stale in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale.path, ignore_errors=True)
    dist.barrier()
    return final


def _save_synced(obj: Any, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(path: Path) -> dict:
    """meta.json of a complete checkpoint; ``CheckpointError`` saying what is wrong otherwise."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no meta.json (an incomplete checkpoint)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}/meta.json: unreadable: {exc}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                              f"this epplan reads {FORMAT!r} version {VERSION}")
    for name, size in meta["files"].items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            raise CheckpointError(f"{path}: {name} is missing or not {size} bytes")
    return meta


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """The complete checkpoints under ``root``, oldest first."""
    found = []
    for path in root.glob("step_*") if root.is_dir() else []:
        match = _NAME.match(path.name)
        if not match:
            continue
        try:
            found.append(CheckpointInfo(path, int(match.group(1)), read_meta(path)))
        except CheckpointError:
            continue
    return sorted(found, key=lambda c: c.step)


def latest(root: Path) -> CheckpointInfo | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def refuse_fresh_start(root: Path, out: str | Path) -> None:
    """A run from step 0 must not mix with an earlier run's checkpoints under ``root``."""
    found = latest(root)
    if found is not None:
        raise CheckpointError(f"{out} already holds checkpoints (newest: step {found.step}); pass --resume "
                              "to continue from it, or choose another --out")


@torch.no_grad()
def load(info: CheckpointInfo, model: nn.Module, optimizer: torch.optim.Optimizer, *, rank: int,
         device: torch.device) -> dict:
    """Load checkpoint ``info`` into this rank's model and optimizer (not collective).

    The model must be expert-parallel already, under any placement with the same model shape.
    Returns dense.pt's ``extra`` and, when this rank's file exists, its RNG states under "rng".
    """
    def read(name: str) -> dict:
        try:
            return torch.load(info.path / name, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # any defect of the file: say which file
            raise CheckpointError(f"{info.path / name}: cannot be read: {exc}") from None

    dense = read("dense.pt")
    experts = _expert_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for key, t in model.state_dict().items():
        if key in experts:
            continue
        if key not in dense["model"] or dense["model"][key].shape != t.shape:
            found = tuple(dense["model"][key].shape) if key in dense["model"] else "nothing"
            raise CheckpointError(f"{info.path}: {key} has shape {tuple(t.shape)} in this model, "
                                  f"{found} in the checkpoint; resume with the model it was written for")
        t.copy_(dense["model"][key])
    for p in model.parameters():
        name = names[id(p)]
        if name in dense["optim"]:
            optimizer.state[p] = {k: _state_value(v, device) for k, v in dense["optim"][name].items()}

    files: dict[str, dict] = {}
    owners = info.meta["expert_owners"]
    for key, (module, w) in experts.items():
        module_name = key.rsplit(".", 1)[0]
        slots = []
        for j, e in enumerate(module.local_experts):
            file = f"rank{owners[module_name][e]:05d}.pt"
            if file not in files:
                files[file] = read(file)
            entry = f"{key}[{e}]"
            w[j].copy_(files[file]["model"][entry])
            slots.append(files[file]["optim"][entry])
        if slots and slots[0]:
            optimizer.state[w] = {k: _state_value(torch.stack([s[k] for s in slots])
                                                  if slots[0][k].dim() > 0 else slots[0][k], device)
                                  for k in slots[0]}
    out = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in dense["extra"].items()}
    own = f"rank{rank:05d}.pt"
    if own in info.meta["files"]:
        out["rng"] = (files.get(own) or read(own))["rng"]
    return out


def _state_value(v: Any, device: torch.device) -> Any:
    """An optimizer-state value loaded from a file: per-element tensors go to ``device``; scalar
    tensors (AdamW's ``step``) stay on the CPU, where non-capturable optimizers keep them. Always a
    copy, never a view of the memory-mapped file."""
    if not isinstance(v, torch.Tensor):
        return v
    return v.clone() if v.dim() == 0 else v.to(device=device, copy=True)
