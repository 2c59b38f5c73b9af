"""Checkpoints through ``torch.distributed.checkpoint`` (DCP) that survive crashes and re-placement.

Layout of one checkpoint, ``OUT/checkpoints/step_00000040/``::

    .metadata        DCP's index: every entry's name, shape, dtype, and where its bytes are
    __3_0.distcp     DCP's file of rank 3: the entries DCP gave that rank to write
    meta.json        format, step, manifest hash, model, files and their sizes, expert owners,
                     optimizer sharding, data position, run facts (written after the files)
    checksums.json   SHA-256 and size of every other file of the directory (written last)

The entries (one flat DCP state dict; ``state_to_save``): ``model.<name>`` for every
non-expert tensor of the model (the same on all ranks: DCP writes each once, spread over the
ranks); each expert's weight by *logical* id, ``model.layers.1.ffn.experts.w1[5]``, and its
AdamW state, ``optim.layers.1.ffn.experts.w1[5].exp_avg`` (written by its owner, the lowest
replica); ``optim.<name>.<field>`` for the dense parameters' AdamW state (by whichever rank
keeps it under the run's ``--optimizer-sharding``; under ``all``, an expert's state by the replica
that keeps it); ``rng.rank00003``, each rank's RNG states;
``extra`` (rank 0: routing counts). A checkpoint therefore does not depend on the placement,
world size or optimizer sharding that wrote it: on load each rank asks DCP for the entries it
needs now (the experts it holds under the new placement, the optimizer state it keeps under the
new sharding), wherever they were written, and reads only those.

Atomicity: DCP writes into ``.step_00000040.tmp/`` (each file fsynced); after every rank has
written, rank 0 writes ``meta.json`` (with each file's size), the ranks hash a share of the files
each, rank 0 writes ``checksums.json`` and renames the directory. A crash at any point leaves
either no ``step_*`` directory or a complete one; ``list_checkpoints`` ignores directories whose
meta or files are missing or short, and ``verify`` (run before every load) compares each file's
content with its checksum, so a damaged checkpoint of the right size is skipped, never loaded.
``--out`` must be on a filesystem that all nodes share.

Writing is split in two so that training need not wait for the files: ``begin_save`` hands the
state to ``dcp.async_save``, which copies it to host memory (``HostStaging``: pinned buffers
cached from one checkpoint to the next) and writes the files from that copy in its own thread;
``complete_save`` then waits for the files and seals and renames the directory, collectively over
a gloo group of the writer's own, in a thread of the trainer's (``Trainer.save``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import AsyncStager

from epplan.errors import CheckpointError, param
from epplan.runtime.expert_parallel import ExpertParallelExperts
from epplan.runtime.expert_tensor_parallel import logical_view
from epplan.train.optim import TrainOptimizer

FORMAT = "epplan.checkpoint"
VERSION = 2  # 1: a torch.save file per rank (epplan before DCP), not read
WRITER = "torch.distributed.checkpoint"
_NAME = re.compile(r"^step_(\d{8})$")
CHECKSUMS = "checksums.json"
DIVERGED = ".diverged"  # suffix of a checkpoint set aside because training diverged right after it


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


# ------------------------------------------------------------------ experts by logical id
#
# An expert's tensors are named by (layer module, weight, logical expert id), never by rank or
# slot: checkpoints store them so, and code that moves experts between ranks (re-placement)
# can address them so. A rank's expert weight tensor is (E_loc, ...) over its slots; the AdamW
# state of slot j is ``TrainOptimizer.expert_slot_states(w)[j]`` under every sharding.

ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")  # the fields of a slot's state, in the order moves send them


def _logical(module: ExpertParallelExperts, weight_name: str, t: torch.Tensor) -> torch.Tensor:
    """One slot's weight or moment as the whole expert's tensor: itself, or under expert tensor
    parallelism its hidden slice as a DTensor over the TP group (DCP then reads and writes the
    slice of the unsharded entry: a checkpoint does not depend on --expert-tp)."""
    if module.expert_tp is None or t.dim() == 0:  # t.dim() == 0: AdamW's step
        return t
    return logical_view(weight_name, t, module.expert_tp)


def expert_key(module_name: str, weight_name: str, expert: int) -> str:
    """('layers.1.ffn.experts', 'w1', 5) -> 'layers.1.ffn.experts.w1[5]'."""
    return f"{module_name}.{weight_name}[{expert}]"


def expert_entries(model: nn.Module, optimizer: TrainOptimizer, *, rank: int,
                   owned_only: bool = True) -> dict[str, torch.Tensor]:
    """This rank's expert weights and their AdamW state by logical id, as views (no copy):
    ``model.<key>`` -> (D, F) or (F, D) weight, ``optim.<key>.exp_avg`` / ``.exp_avg_sq`` -> its
    moments, ``optim.<key>.step`` -> the step (a scalar), with ``<key>`` from ``expert_key``.
    owned_only: only the experts this rank owns (their lowest replica), as checkpoints store them
    (their state too, unless ``--optimizer-sharding all`` gave it to another replica: then that
    replica gives it); otherwise every local slot. A slot without AdamW state here (another
    replica keeps it; before the first step) has no ``optim.`` entries."""
    out: dict[str, torch.Tensor] = {}
    sharded = optimizer.sharding == "all"
    for key, (module, w) in _expert_params(model).items():
        module_name, wname = key.rsplit(".", 1)
        for j, (e, state) in enumerate(zip(module.local_experts, optimizer.expert_slot_states(w))):
            is_owner = not owned_only or module.owner[e] == rank
            name = expert_key(module_name, wname, e)
            if is_owner:
                out[f"model.{name}"] = _logical(module, wname, w.detach()[j])
            if state and (is_owner or sharded):
                out.update({f"optim.{name}.{f}": _logical(module, wname, v) for f, v in state.items()})
    return out


def expert_targets(model: nn.Module, optimizer: TrainOptimizer,
                   modules: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Writable views of every local expert slot's weight and of the AdamW state this rank keeps
    for it, by logical id (the keys of ``expert_entries``), with fresh AdamW states installed
    (``TrainOptimizer.expert_slot_states(fresh=True)``): what was saved under those keys, copied
    in, becomes this rank's experts and their state. Slots of one stacked tensor share its
    ``step`` unless the optimizer is sharded ``all``.
    modules: only the expert layers of these names (``layers.1.ffn.experts``; None: all)."""
    out: dict[str, torch.Tensor] = {}
    for key, (module, w) in _expert_params(model).items():
        module_name, wname = key.rsplit(".", 1)
        if modules is not None and module_name not in modules:
            continue
        for j, (e, state) in enumerate(zip(module.local_experts, optimizer.expert_slot_states(w, fresh=True))):
            name = expert_key(module_name, wname, e)
            out[f"model.{name}"] = _logical(module, wname, w.detach()[j])
            out.update({f"optim.{name}.{f}": _logical(module, wname, v) for f, v in (state or {}).items()})
    return out


# ------------------------------------------------------------------ writing

def _pack(obj: Any) -> bytes:
    """A non-tensor entry (RNG states, run extras): DCP stores a ``bytes`` value as one opaque item."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _rng_key(rank: int) -> str:
    return f"rng.rank{rank:05d}"


def state_to_save(model: nn.Module, optimizer: TrainOptimizer, *, rank: int, extra: dict) -> dict[str, Any]:
    """This rank's part of a checkpoint as a flat DCP state dict of views (no copy).

    ``model.<name>``: every non-expert tensor of the model's state_dict (identical on all ranks:
    DCP writes each once); experts and their AdamW state by logical id (``expert_entries``,
    owners only); ``optim.<name>.<field>``: the AdamW state of each dense parameter this rank keeps
    (all of them unsharded, its share under ``--optimizer-sharding dense``); this rank's RNG
    states; on rank 0, ``extra`` (routing counts and the like).
    """
    experts = _expert_params(model)
    out: dict[str, Any] = {f"model.{k}": v for k, v in model.state_dict().items() if k not in experts}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in optimizer.state_items():
        name = names.get(id(p))  # None: an expert slot's view (sharding "all")
        if name is not None and name not in experts:
            out.update({f"optim.{name}.{f}": v for f, v in state.items()})
    out.update(expert_entries(model, optimizer, rank=rank))
    out[_rng_key(rank)] = _pack(rng_state())
    if rank == 0:
        out["extra"] = _pack(extra)
    return out


class HostStaging(AsyncStager):
    """``dcp.async_save``'s staging: a host copy of every tensor of the state dict, into buffers
    kept from one checkpoint to the next (pinned on GPUs, so the copy runs at PCIe speed and
    allocates nothing after the first checkpoint); training waits for the copy, not the files.

    Why not a stager torch ships: torch 2.11's ``DefaultStager`` clears its cache and its
    deep-copy table after every stage, so each checkpoint pins its buffers anew and the second
    ``async_save`` fails (``KeyError: <class 'type'>`` on an H200, 2026-12-02); the cache of
    ``BlockingAsyncStager`` always pins (no CUDA, no pinning), and without its cache older torch
    hands CPU tensors over uncopied, which training would then change under the writer.
    """

    _synchronize_after_execute = False

    def __init__(self, pin_memory: bool) -> None:
        self.pin_memory = pin_memory
        self.buffers: dict[str, torch.Tensor] = {}

    def _copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self.buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin_memory and t.is_cuda)
        return buf.copy_(t, non_blocking=buf.is_pinned())

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The host copy of the flat ``state_dict`` (tensors copied; other values as they are)."""
        out = {k: self._copy(k, v) if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}
        if self.pin_memory and torch.cuda.is_available():
            torch.cuda.synchronize()  # NOTE: host sync: the copies are complete before training goes on
        return out

    def synchronize_staging(self) -> None:
        """Nothing to wait for: ``stage`` returns once the copy is complete."""

    def close(self) -> None:
        self.buffers.clear()

    @property
    def num_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


@dataclass
class PendingSave:
    """A checkpoint whose files are being written (``begin_save``); ``complete_save`` finishes it."""

    tmp: Path
    final: Path
    step: int
    rank: int
    group: dist.ProcessGroup | None
    future: Future | None  # DCP's background write; None once written
    facts: dict  # for meta.json: expert owners, optimizer sharding


def begin_save(root: Path, step: int, state: dict[str, Any], *, rank: int, facts: dict,
               group: dist.ProcessGroup | None = None, stager: HostStaging | None = None) -> PendingSave:
    """Start writing checkpoint ``step`` of ``state`` (``state_to_save``) into ``root/.step_N.tmp``
    (collective over ``group``, default the world). With a ``stager``, ``dcp.async_save``: returns
    once the state is copied to host memory, and DCP's thread writes the files (its collectives
    over ``group``, which must be a gloo group apart from training's); without, ``dcp.save``
    writes them before returning. facts: JSON-able facts of the state for meta.json."""
    tmp, final = root / f".step_{step:08d}.tmp", root / f"step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written one from a crashed attempt
        tmp.mkdir(parents=True)
    dist.barrier(group=group)
    if not tmp.is_dir():
        raise CheckpointError(f"rank {rank} cannot see {tmp}, which rank 0 created: {param('out')} must be on "
                              "a filesystem shared by all nodes")
    writer = dcp.FileSystemWriter(tmp, sync_files=True)
    pending = PendingSave(tmp, final, step, rank, group, None, facts)
    if stager is None:
        with _write_errors(tmp):
            dcp.save(state, storage_writer=writer, process_group=group)
    else:
        pending.future = dcp.async_save(state, storage_writer=writer, process_group=group, async_stager=stager)
    return pending


@contextlib.contextmanager
def _write_errors(tmp: Path):
    """DCP's failure on any rank (a full disk, say), raised on every rank, as a CheckpointError."""
    try:
        yield
    except (CheckpointException, OSError, RuntimeError) as exc:
        cause = exc
        if isinstance(exc, CheckpointException) and exc.failures:
            cause = next(iter(exc.failures.values()))
            cause = getattr(cause, "exc", cause)  # DCP wraps a rank's exception with its traceback
        what = getattr(cause, "strerror", None) or cause
        raise CheckpointError(f"cannot write the checkpoint {tmp}: {what}; the earlier checkpoints are intact "
                              f"(free space, then continue with {param('resume')})") from None


def complete_save(pending: PendingSave, *, meta: dict) -> Path:
    """Finish ``pending`` (collective over its group): wait for its files, write ``meta.json``,
    the checksums, and rename the directory, which completes the checkpoint. Returns its path."""
    tmp, final, rank, group = pending.tmp, pending.final, pending.rank, pending.group
    if pending.future is not None:
        with _write_errors(tmp):
            pending.future.result()
        pending.future = None
    world_size = dist.get_world_size(group)
    with _all_or_none(world_size, group):
        if rank == 0:
            files = {name: (tmp / name).stat().st_size for name in _files_of(tmp)}
            doc = {"format": FORMAT, "version": VERSION, "writer": WRITER, "step": pending.step,
                   "time": time.time(), "num_ranks": world_size, **meta, **pending.facts, "files": files}
            _write_json_synced(tmp / "meta.json", doc)
    with _all_or_none(world_size, group):
        seal(tmp, rank=rank, world_size=world_size, group=group)
    if rank == 0:
        if final.exists():  # the same step again (a restarted attempt got here before): replace it
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
    dist.barrier(group=group)
    return final


def save_facts(model: nn.Module, optimizer: TrainOptimizer) -> dict:
    """What meta.json says of a checkpoint's state: who owned each expert, the optimizer sharding."""
    return {"expert_owners": {name: [int(o) for o in m.owner] for name, m in _expert_modules(model)},
            "optimizer_sharding": optimizer.sharding}


def save(root: Path, step: int, model: nn.Module, optimizer: TrainOptimizer, *, rank: int,
         meta: dict, extra: dict, group: dist.ProcessGroup | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` and complete it (collective, synchronous)."""
    state = state_to_save(model, optimizer, rank=rank, extra=extra)
    pending = begin_save(root, step, state, rank=rank, facts=save_facts(model, optimizer), group=group)
    return complete_save(pending, meta=meta)


def _write_json_synced(path: Path, doc: dict) -> None:
    try:
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}; the earlier checkpoints are "
                              f"intact (free space, then continue with {param('resume')})") from None


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


def prune(root: Path, keep: int, *, through_step: int | None = None) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (0 keeps all) among those of step
    ``through_step`` or earlier (default: all). A checkpoint after ``through_step`` (completed by a
    background writer, not yet known good) is neither deleted nor counted, so the newest known
    good one always stays."""
    found = [c for c in list_checkpoints(root) if through_step is None or c.step <= through_step]
    for stale in found[:-keep] if keep > 0 else []:
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
        if isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("version") == 1:
            found = "written by an earlier epplan as a torch.save file per rank (format version 1)"
        raise CheckpointError(f"{path}: {found}; this epplan reads {FORMAT!r} version {VERSION} "
                              f"({WRITER}): continue that run with the epplan that wrote it")
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
        raise CheckpointError(f"{out} already holds checkpoints (newest: step {found.step}); pass {param('resume')} "
                              f"to continue from it, or choose another {param('out')}")


def _saved_entries(path: Path) -> dict[str, Any]:
    """The checkpoint's DCP metadata: entry name -> its ``TensorStorageMetadata`` or ``BytesStorageMetadata``."""
    try:
        return dict(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    except Exception as exc:  # any defect of the file: say which
        raise CheckpointError(f"{path}/.metadata: cannot be read: {exc}") from None


def _check_targets(path: Path, targets: dict[str, Any], saved: dict[str, Any]) -> None:
    for key, t in targets.items():
        entry = saved.get(key)
        if entry is None:
            raise CheckpointError(f"{path} holds no {key}; resume with the model and run it was written for")
        if isinstance(t, torch.Tensor) and (not isinstance(entry, TensorStorageMetadata) or entry.size != t.shape):
            found = tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else "no tensor"
            raise CheckpointError(f"{path}: {key.split('.', 1)[1]} has shape {tuple(t.shape)} in this model, "
                                  f"{found} in the checkpoint; resume with the model it was written for")


def _read(path: Path, targets: dict[str, Any]) -> None:
    """DCP's load of ``targets`` in place, by this process alone (each rank reads only its entries)."""
    try:
        with warnings.catch_warnings():  # that no_dist means one process is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(targets, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    except Exception as exc:  # any defect of the files: say which checkpoint
        raise CheckpointError(f"{path}: cannot be read: {exc}") from None


@torch.no_grad()
def load(info: CheckpointInfo, model: nn.Module, optimizer: TrainOptimizer, *, rank: int,
         device: torch.device) -> dict:
    """Load checkpoint ``info`` into this rank's model and optimizer (not collective).

    The model must be expert-parallel already, under any placement with the same model shape,
    and the optimizer of any sharding: each rank reads the dense tensors, the experts it holds now
    (by logical id) and the AdamW state it keeps now, wherever they were written. Returns rank 0's
    ``extra`` and, when the checkpoint holds this rank's RNG states, them under "rng".
    """
    saved = _saved_entries(info.path)
    experts = _expert_params(model)
    targets: dict[str, Any] = {f"model.{k}": t for k, t in model.state_dict().items() if k not in experts}
    for name, p in model.named_parameters():
        if name not in experts and optimizer.keeps(p):
            targets.update({f"optim.{name}.{f}": v for f, v in optimizer.fresh_state(p).items()})
    targets.update(expert_targets(model, optimizer))
    targets["extra"] = b""
    if _rng_key(rank) in saved:
        targets[_rng_key(rank)] = b""
    _check_targets(info.path, targets, saved)
    _read(info.path, targets)
    out = _unpack(targets["extra"])
    if _rng_key(rank) in targets:
        out["rng"] = _unpack(targets[_rng_key(rank)])
    return out


def read_tensors(path: Path) -> dict[str, Any]:
    """Every entry of checkpoint ``path``, read whole into this process (for tools and tests; a
    large checkpoint needs that much memory): tensors, and the unpacked non-tensor entries."""
    out: dict[str, Any] = {}
    for key, entry in _saved_entries(path).items():
        out[key] = (torch.empty(entry.size, dtype=entry.properties.dtype)
                    if isinstance(entry, TensorStorageMetadata) else b"")
    _read(path, out)
    return {k: _unpack(v) if isinstance(v, bytes) else v for k, v in out.items()}
