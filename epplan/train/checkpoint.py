"""Checkpoints that survive crashes and re-placement.

Layout of one checkpoint, ``OUT/checkpoints/step_00000040/``::

    meta.json        format, step, manifest hash, model, files and their sizes, expert owners,
                     data position, run extras (written last)
    dense.pt         rank 0: every non-expert tensor of the model's state_dict (attention, norms,
                     embeddings, routers and their selection biases) and, unless the optimizer
                     is sharded, the dense parameters' optimizer state
    rank00003.pt     rank 3: the experts it owns (lowest replica), one entry per (layer, expert),
                     with their optimizer state; under ``--optimizer-sharding dense`` the dense
                     parameters' optimizer state that rank 3 keeps; its RNG states

Experts are stored by *logical* id (``layers.1.ffn.experts.w1[5]``), never by slot on a rank, so
a checkpoint does not depend on the placement that wrote it: resuming under another placement
(``epplan place`` again, from the run's routing statistics) loads each rank's new experts from
whichever files hold them, with their AdamW moments. The dense parameters' optimizer state is
stored by parameter name (``meta.json``'s ``dense_optim_files`` says which file holds each), so
a run resumes under another optimizer sharding or world size. Each rank reads only the entries
it needs (memory-mapped ``torch.load``).

    checksums.json   SHA-256 and size of every other file of the directory (written last)

Atomicity: everything is written into ``.step_00000040.tmp/``; after every rank has written and
synced its file, rank 0 writes ``meta.json`` (with each file's size), the ranks hash a share of the
files each, rank 0 writes ``checksums.json`` and renames the directory. A crash at any point leaves
either no ``step_*`` directory or a complete one; ``list_checkpoints`` ignores directories whose
meta or files are missing or short, and ``verify`` (run before every load) compares each file's
content with its checksum, so a damaged checkpoint of the right size is skipped, never loaded.
``seal`` and ``verify`` look only at the files of a directory, not at how they were written, so
they serve any checkpoint writer (torch.save here, torch.distributed.checkpoint as well).
``--out`` must be on a filesystem that all nodes share.

Writing is split in two: ``stage`` copies a rank's part to the host (into pinned buffers that a
``Staging`` keeps from one checkpoint to the next) and ``write`` does all of the above from that
copy, collectively over a group it is given, so that a background thread can write while
training goes on (``Trainer.save``).
"""

from __future__ import annotations

import contextlib
import hashlib
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
from epplan.train.optim import TrainOptimizer

FORMAT = "epplan.checkpoint"
VERSION = 1
_NAME = re.compile(r"^step_(\d{8})$")
CHECKSUMS = "checksums.json"
DIVERGED = ".diverged"  # suffix of a checkpoint set aside because training diverged right after it


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
    """Optimizer state of local slot j: per-element tensors sliced (views), scalars (``step``) kept."""
    return {k: v[j] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in state.items()}


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


class Staging:
    """Pinned host copies of a checkpoint's GPU tensors, kept from one checkpoint to the next, so
    that taking a checkpoint costs training one device-to-host copy (no allocation after the first)
    while files are written in the background. CPU tensors are cloned."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def copy(self, name: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.device.type == "cpu":
            return t.clone()
        buf = self.buffers.get(name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self.buffers[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t, non_blocking=True)

    @property
    def num_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


@dataclass
class Staged:
    """One rank's part of a checkpoint, on the host: what ``write`` puts in the files."""

    mine: dict  # this rank's file: its experts (by logical id), their state, RNG (, dense state)
    dense: dict | None  # rank 0: dense.pt's model and optimizer state
    owners: dict  # expert owners per layer module
    sharding: str
    dense_optim_names: list[str]  # the dense parameters whose optimizer state this rank stores


def stage(model: nn.Module, optimizer: TrainOptimizer, *, rank: int, staging: Staging | None = None) -> Staged:
    """Copy this rank's part of a checkpoint to the host (not collective). Returns once the copy
    is complete: training may then change the weights and optimizer state."""
    staging = staging or Staging()

    def copied(prefix: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return staging.copy(prefix, value)
        if isinstance(value, dict):
            return {k: copied(f"{prefix}/{k}", v) for k, v in value.items()}
        return value

    experts = _expert_params(model)
    own_model, own_optim = {}, {}
    for key, (module, w) in experts.items():
        opt_state = optimizer.state_of(w) or {}
        for j, e in enumerate(module.local_experts):
            if module.owner[e] == rank:
                entry = f"{key}[{e}]"
                own_model[entry] = staging.copy(f"model/{entry}", w[j])
                own_optim[entry] = copied(f"optim/{entry}", _slice_state(opt_state, j))
    names = {id(p): n for n, p in model.named_parameters()}
    dense_optim = {names[id(p)]: copied(f"dense_optim/{names[id(p)]}", s)
                   for p, s in optimizer.state_items() if names[id(p)] not in experts}
    sharded = optimizer.sharding != "none"
    mine = {"model": own_model, "optim": own_optim, "rng": rng_state()}
    if sharded:
        mine["dense_optim"] = dense_optim
    dense = None
    if rank == 0:
        dense = {"model": {k: staging.copy(f"dense/{k}", v) for k, v in model.state_dict().items()
                           if k not in experts},
                 "optim": {} if sharded else dense_optim}
    if any(b.is_pinned() for b in staging.buffers.values()) and torch.cuda.is_available():
        torch.cuda.synchronize()  # NOTE: host sync: the copies are complete before training goes on
    owners = {name: [int(o) for o in m.owner] for name, m in _expert_modules(model)}
    return Staged(mine, dense, owners, optimizer.sharding, sorted(dense_optim) if sharded else [])


def save(root: Path, step: int, model: nn.Module, optimizer: TrainOptimizer, *, rank: int,
         meta: dict, dense_extra: dict, keep: int) -> Path:
    """Write checkpoint ``step`` under ``root`` (collective). Returns its directory.

    meta: JSON-able facts for ``meta.json`` (manifest hash, model, data position, ...).
    dense_extra: tensors/objects rank 0 stores next to the dense state (e.g. routing counts).
    keep: checkpoints to keep, newest first (older ones are deleted after this one is complete).
    """
    return write(stage(model, optimizer, rank=rank), root, step, rank=rank, meta=meta,
                 dense_extra=dense_extra, keep=keep)


def write(staged: Staged, root: Path, step: int, *, rank: int, meta: dict, dense_extra: dict, keep: int,
          group: dist.ProcessGroup | None = None) -> Path:
    """Write a staged checkpoint: the files, ``meta.json``, the checksums, then the rename that
    completes it (collective over ``group``, default the world; a background writer passes a
    group of its own so that its collectives never interleave with training's)."""
    tmp, final = root / f".step_{step:08d}.tmp", root / f"step_{step:08d}"
    world_size = dist.get_world_size(group)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written one from a crashed attempt
        tmp.mkdir(parents=True)
    dist.barrier(group=group)
    if not tmp.is_dir():
        raise CheckpointError(f"rank {rank} cannot see {tmp}, which rank 0 created: --out must be on "
                              "a filesystem shared by all nodes")
    with _all_or_none(world_size, group):
        _save_synced(staged.mine, tmp / f"rank{rank:05d}.pt")
        if rank == 0:
            _save_synced({**staged.dense, "extra": dense_extra}, tmp / "dense.pt")
    kept = _gather(staged.dense_optim_names, world_size, group)  # who stores which dense state
    with _all_or_none(world_size, group):
        if rank == 0:
            files = {p.name: p.stat().st_size for p in sorted(tmp.glob("*.pt"))}
            dense_files = ({n: f"rank{r:05d}.pt" for r, ns in enumerate(kept) for n in ns}
                           if staged.sharding != "none" else {n: "dense.pt" for n in staged.dense["optim"]})
            doc = {"format": FORMAT, "version": VERSION, "step": step, "time": time.time(),
                   "num_ranks": world_size, **meta, "expert_owners": staged.owners,
                   "optimizer_sharding": staged.sharding, "dense_optim_files": dense_files, "files": files}
            _write_json_synced(tmp / "meta.json", doc)
    with _all_or_none(world_size, group):
        seal(tmp, rank=rank, world_size=world_size, group=group)
    if rank == 0:
        if final.exists():  # the same step again (a restarted attempt got here before): replace it
            old = root / f".step_{step:08d}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_dir(root)
        prune(root, keep)
    dist.barrier(group=group)
    return final


def _save_synced(obj: Any, path: Path) -> None:
    try:
        with open(path, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        path.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {exc}; the earlier checkpoints are intact "
                              "(free space, then continue with --resume)") from None


def _write_json_synced(path: Path, doc: dict) -> None:
    try:
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}; the earlier checkpoints are "
                              "intact (free space, then continue with --resume)") from None


@contextlib.contextmanager
def _all_or_none(world_size: int, group: dist.ProcessGroup | None = None):
    """Collective: the block's ``CheckpointError`` on any rank is raised on every rank (a rank
    that failed to write must not leave the others waiting in the next barrier)."""
    error = None
    try:
        yield
    except CheckpointError as exc:
        error = str(exc)
    errors = [e for e in _gather(error, world_size, group) if e]
    if errors:
        raise CheckpointError(errors[0])


def prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (0 keeps all)."""
    for stale in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale.path, ignore_errors=True)


# ------------------------------------------------------------------------------ checksums

def _files_of(directory: Path) -> list[str]:
    """Every regular file under ``directory`` but the checksums, as sorted relative paths."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS)


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _share(items: list[str], rank: int, world_size: int) -> list[str]:
    return items[rank::world_size]


def _gather(mine: Any, world_size: int, group: dist.ProcessGroup | None = None) -> list[Any]:
    if world_size == 1 or not dist.is_initialized():
        return [mine]
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, mine, group=group)
    return everyone


def seal(directory: Path, *, rank: int = 0, world_size: int = 1, group: dist.ProcessGroup | None = None) -> None:
    """Write ``directory/checksums.json`` over every file in it (collective when world_size > 1:
    each rank hashes a share of the files; rank 0 writes). Call after all files are synced."""
    files = _files_of(directory)
    mine = {name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
            for name in _share(files, rank, world_size)}
    sums: dict[str, dict] = {}
    for part in _gather(mine, world_size, group):
        sums.update(part)
    if rank == 0:
        _write_json_synced(directory / CHECKSUMS, {"algorithm": "sha256",
                                                   "files": {name: sums[name] for name in files}})


def _read_checksums(path: Path) -> dict[str, dict]:
    try:
        doc = json.loads((path / CHECKSUMS).read_text())
        files = doc["files"]
        if doc.get("algorithm") != "sha256" or not isinstance(files, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                for v in files.values()):
            raise ValueError("not a checksum list")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {CHECKSUMS} (an incomplete checkpoint)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}/{CHECKSUMS}: unreadable: {exc}") from None
    return files


def verify(path: Path, *, rank: int = 0, world_size: int = 1) -> str | None:
    """Why checkpoint ``path`` is damaged (a file missing, short, or not the content sealed), or
    None if every file is intact. Collective when world_size > 1 (each rank hashes a share); the
    answer is the same on every rank."""
    try:
        sums = _read_checksums(path)
        problem = None
        for name in _share(sorted(sums), rank, world_size):
            file = path / name
            if not file.is_file():
                problem = f"{name} is missing"
            elif file.stat().st_size != sums[name]["size"]:
                problem = f"{name} is {file.stat().st_size} bytes, {sums[name]['size']} were written"
            elif _sha256(file) != sums[name]["sha256"]:
                problem = f"the content of {name} differs from the checksum written with it"
            if problem:
                break
    except CheckpointError as exc:
        problem = str(exc).removeprefix(f"{path}: ")
    found = [p for p in _gather(problem, world_size) if p]
    return found[0] if found else None


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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = meta if not isinstance(meta, dict) else f"format {meta.get('format')!r} version {meta.get('version')!r}"
        raise CheckpointError(f"{path}: {found}; this epplan reads {FORMAT!r} version {VERSION}")
    for key, kind in (("step", int), ("num_ranks", int), ("files", dict), ("expert_owners", dict),
                      ("model", dict), ("manifest_hash", str)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"{path}/meta.json: {key!r} is missing or not a{'n' * (kind is int)} "
                                  f"{kind.__name__} (a damaged checkpoint)")
    sums = _read_checksums(path)
    for name, entry in sums.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != entry["size"]:
            raise CheckpointError(f"{path}: {name} is missing or not {entry['size']} bytes")
    missing = sorted(set(meta["files"]) - set(sums))
    if missing:
        raise CheckpointError(f"{path}: {missing[0]} is not in {CHECKSUMS}")
    return meta


def scan(root: Path) -> tuple[list[CheckpointInfo], list[str]]:
    """The complete checkpoints under ``root`` (oldest first), and a line for each ``step_*``
    directory that is not one (what is wrong with it). Does not read the files' content."""
    found, damaged = [], []
    for path in root.glob("step_*") if root.is_dir() else []:
        match = _NAME.match(path.name)
        if not match:
            continue
        try:
            found.append(CheckpointInfo(path, int(match.group(1)), read_meta(path)))
        except CheckpointError as exc:
            damaged.append(str(exc))
    return sorted(found, key=lambda c: c.step), sorted(damaged)


def set_diverged(info: CheckpointInfo) -> Path:
    """Rename a checkpoint that training diverged from, so that --resume skips it (it is kept)."""
    target = info.path.with_name(info.path.name + DIVERGED)
    shutil.rmtree(target, ignore_errors=True)
    info.path.rename(target)
    return target


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """The complete checkpoints under ``root``, oldest first."""
    return scan(root)[0]


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
def load(info: CheckpointInfo, model: nn.Module, optimizer: TrainOptimizer, *, rank: int,
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

    files: dict[str, dict] = {"dense.pt": read("dense.pt")}

    def entries(name: str) -> dict:
        if name not in files:
            files[name] = read(name)
        return files[name]

    dense = files["dense.pt"]
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
    # Written before the optimizer could be sharded: rank 0's dense.pt holds it all.
    dense_files = info.meta.get("dense_optim_files") or {n: "dense.pt" for n in dense["optim"]}
    for p in model.parameters():
        name = names[id(p)]
        if name in dense_files and optimizer.keeps(p):
            held = entries(dense_files[name])
            held = held["optim"] if dense_files[name] == "dense.pt" else held["dense_optim"]
            optimizer.set_state(p, {k: _state_value(v, device) for k, v in held[name].items()})

    owners = info.meta["expert_owners"]
    for key, (module, w) in experts.items():
        module_name = key.rsplit(".", 1)[0]
        slots = []
        for j, e in enumerate(module.local_experts):
            file = entries(f"rank{owners[module_name][e]:05d}.pt")
            entry = f"{key}[{e}]"
            w[j].copy_(file["model"][entry])
            slots.append(file["optim"][entry])
        if slots and slots[0]:
            optimizer.set_state(w, {k: _state_value(torch.stack([s[k] for s in slots])
                                                  if slots[0][k].dim() > 0 else slots[0][k], device)
                                  for k in slots[0]})
    out = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in dense["extra"].items()}
    own = f"rank{rank:05d}.pt"
    if own in info.meta["files"]:
        out["rng"] = entries(own)["rng"]
    return out


def _state_value(v: Any, device: torch.device) -> Any:
    """An optimizer-state value loaded from a file: per-element tensors go to ``device``; scalar
    tensors (AdamW's ``step``) stay on the CPU, where non-capturable optimizers keep them. Always a
    copy, never a view of the memory-mapped file."""
    if not isinstance(v, torch.Tensor):
        return v
    return v.clone() if v.dim() == 0 else v.to(device=device, copy=True)
