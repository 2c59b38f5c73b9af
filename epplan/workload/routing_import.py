"""Routing statistics from other frameworks and plain arrays, as per-step counts [L_f, S, E].

Shape legend: L_f = MoE layers of the file, S = source ranks, E = routed (logical) experts,
W = recorded steps (a window), P = physical experts (replicas included).

``--routing FILE`` reads, besides the SmartMoE-style trace and epplan's own statistics:

- **Plain arrays** (``.npy``, ``.npz`` holding one array, ``.pt`` holding one tensor):
  ``[L, E]`` (one pattern for every rank), ``[L, S, E]`` or ``[W, L, S, E]`` token-assignments.
  A step axis is averaged; ``@FIRST:LAST`` keeps steps FIRST..LAST (0-based, inclusive).
- **SGLang** (``sglang.srt.eplb``, the expert distribution recorder of SGLang 0.4.7 and later,
  ``--expert-distribution-recorder-mode stat``): the ``.pt`` it dumps, a dict whose
  ``logical_count`` is ``[L, E]`` or ``[W, L, E]`` over every decoder layer (leading dense layers
  count nothing and are dropped). This is also what SGLang's ``--init-expert-location`` takes.
- **vLLM** (``vllm.distributed.eplb.EplbState``, vLLM 0.10 and later with ``--enable-eplb``):
  a ``.pt`` dict of the state's ``expert_load_window`` ``[W, L, P]`` (or ``expert_load_pass``
  ``[L, P]``) gathered over the EP ranks, with its ``physical_to_logical_map`` ``[L, P]``; the
  physical experts' loads are summed into their logical experts. vLLM keeps these tensors in
  memory only: ``torch.save({k: getattr(state, k) for k in (...)}, path)`` writes the file.
- **Megatron-Core** (``TopKRouter.local_tokens_per_expert``, registered with
  ``--moe-router-enable-expert-bias``; Megatron-Core 0.11 and later): a ``.pt`` dict of the
  buffers by module name, ``{"decoder.layers.3.mlp.router.local_tokens_per_expert": [E], ...}``
  (what ``{n: b for n, b in model.named_buffers() if n.endswith("tokens_per_expert")}`` gives),
  or a list of ``[E]`` tensors, one per MoE layer. Layers are ordered by the number after
  ``layers.``.

Volumes are rescaled to the model and ranks by ``epplan.workload.traffic.fit_counts``, which says
so in its notes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from epplan.errors import TrafficError

SUFFIXES = (".npy", ".npz", ".pt", ".pth")
_LAYER = re.compile(r"layers\.(\d+)\.")


def load_counts_file(path: Path, window: tuple[int, int] | None) -> tuple[np.ndarray, str, list[str]]:
    """float64[L_f, S, E] per-step counts, a source label and notes, from ``path``."""
    if not path.is_file():
        raise TrafficError(f"{path}: routing statistics file not found")
    name = path.name
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise TrafficError(f"{name}: not a readable .npy file ({exc})") from None
        return _plain(name, arr, window)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise TrafficError(f"{name}: not a readable .npz file ({exc})") from None
        if len(arrays) != 1:
            raise TrafficError(f"{name}: holds arrays {', '.join(arrays) or 'none'}; give one [layers, "
                               "experts] or [layers, sources, experts] array, or a 'counts' trace")
        return _plain(name, next(iter(arrays.values())), window)
    return _torch_file(path, window)


def _torch_file(path: Path, window: tuple[int, int] | None) -> tuple[np.ndarray, str, list[str]]:
    import torch

    name = path.name
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or unsafe file
        raise TrafficError(f"{name}: not a readable torch file ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); save tensors, dicts "
                           "and lists of tensors only") from None
    if isinstance(obj, torch.Tensor):
        return _plain(name, _numpy(name, "tensor", obj), window)
    if isinstance(obj, (list, tuple)):
        rows = [_numpy(name, f"[{i}]", t) for i, t in enumerate(obj)]
        return _megatron(name, rows, "list of per-layer tokens_per_expert", window)
    if not isinstance(obj, dict):
        raise TrafficError(f"{name}: holds a {type(obj).__name__}; expected a tensor or a dict")
    if "logical_count" in obj:
        count = _numpy(name, "logical_count", obj["logical_count"])
        if count.ndim == 2:
            count = count[None]
        if count.ndim != 3:
            raise TrafficError(f"{name}: logical_count must be [layers, experts] or [steps, layers, "
                               f"experts], got shape {count.shape}")
        steps = _window(name, count, window)
        mean = steps.mean(axis=0)  # [L, E]
        # SGLang counts every decoder layer; the dense ones ahead of the MoE layers stay zero.
        routed = np.flatnonzero(mean.sum(axis=1) > 0)
        dense = int(routed[0]) if routed.size else 0
        notes = [f"{name}: its first {dense} layer(s) route nothing (dense layers) and are dropped"] if dense else []
        return mean[dense:, None, :], f"{name} (SGLang logical_count, {steps.shape[0]} step(s))", notes
    if "expert_load_window" in obj or "expert_load_pass" in obj:
        return _vllm(name, obj, window)
    keys = [k for k in obj if isinstance(k, str) and k.endswith("tokens_per_expert")]
    if keys:
        numbered = []
        for k in keys:
            match = _LAYER.search(k)
            if not match:
                raise TrafficError(f"{name}: key {k!r} names no layer ('layers.N.'); Megatron-Core "
                                   "buffers are named decoder.layers.N.mlp.router.local_tokens_per_expert")
            numbered.append((int(match.group(1)), k))
        rows = [_numpy(name, k, obj[k]) for _, k in sorted(numbered)]
        return _megatron(name, rows, f"Megatron-Core {len(rows)} layers' tokens_per_expert", window)
    raise TrafficError(f"{name}: a dict with keys {', '.join(map(str, list(obj)[:6]))}: none of "
                       "logical_count (SGLang), expert_load_window/expert_load_pass with "
                       "physical_to_logical_map (vLLM), *tokens_per_expert (Megatron-Core)")


def _plain(name: str, arr: np.ndarray, window: tuple[int, int] | None) -> tuple[np.ndarray, str, list[str]]:
    arr = _checked(name, "array", arr)
    if arr.ndim == 2:
        if window is not None:
            raise TrafficError(f"{name}: a [layers, experts] array has no step axis for a window")
        return arr[:, None, :], f"{name} ([layers, experts], one pattern for every source)", []
    if arr.ndim == 3:
        if window is not None:
            raise TrafficError(f"{name}: a [layers, sources, experts] array has no step axis for a "
                               "window; a window needs [steps, layers, sources, experts]")
        return arr, f"{name} ([layers, sources, experts])", []
    if arr.ndim == 4:
        steps = _window(name, arr, window)
        return steps.mean(axis=0), f"{name} ({steps.shape[0]} step(s) of [layers, sources, experts])", []
    raise TrafficError(f"{name}: an array of shape {arr.shape}; expected [layers, experts], "
                       "[layers, sources, experts] or [steps, layers, sources, experts]")


def _vllm(name: str, obj: dict[str, Any], window: tuple[int, int] | None) -> tuple[np.ndarray, str, list[str]]:
    if "physical_to_logical_map" not in obj:
        raise TrafficError(f"{name}: vLLM expert loads are per physical expert; save the state's "
                           "physical_to_logical_map beside them")
    p2l = _numpy(name, "physical_to_logical_map", obj["physical_to_logical_map"])
    if "expert_load_window" in obj:
        load = _numpy(name, "expert_load_window", obj["expert_load_window"])
        if load.ndim != 3:
            raise TrafficError(f"{name}: expert_load_window must be [steps, layers, physical experts], "
                               f"got shape {load.shape}")
        load = _window(name, load, window).mean(axis=0)
        what = "expert_load_window"
    else:
        load = _numpy(name, "expert_load_pass", obj["expert_load_pass"])
        what = "expert_load_pass"
    if p2l.ndim != 2 or load.shape != p2l.shape:
        raise TrafficError(f"{name}: {what} has [layers, physical experts] {list(load.shape)}, "
                           f"physical_to_logical_map {list(p2l.shape)}; they must match (gather the "
                           "loads of every EP rank, as EplbState.rearrange does)")
    if p2l.dtype.kind not in "iu" or p2l.min() < 0:
        raise TrafficError(f"{name}: physical_to_logical_map must hold expert indices >= 0")
    num_experts = int(p2l.max()) + 1
    counts = np.zeros((load.shape[0], num_experts))
    for layer in range(load.shape[0]):
        np.add.at(counts[layer], p2l[layer], load[layer])
    notes = [f"{name}: {p2l.shape[1]} physical experts' loads summed into {num_experts} logical experts"]
    return counts[:, None, :], f"{name} (vLLM {what})", notes


def _megatron(name: str, rows: list[np.ndarray], what: str,
              window: tuple[int, int] | None) -> tuple[np.ndarray, str, list[str]]:
    if window is not None:
        raise TrafficError(f"{name}: per-layer tokens_per_expert has no step axis for a window")
    if not rows or any(r.ndim != 1 for r in rows) or len({r.size for r in rows}) != 1:
        raise TrafficError(f"{name}: expected one [experts] vector per MoE layer, all of one length; got "
                           f"shapes {[list(r.shape) for r in rows][:6]}")
    return np.stack(rows)[:, None, :], f"{name} ({what})", []


def _numpy(name: str, key: str, value: Any) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise TrafficError(f"{name}: {key} is a {type(value).__name__}, expected a tensor")
    arr = value.detach().cpu()
    if key == "physical_to_logical_map":
        return arr.to(torch.int64).numpy()
    return _checked(name, key, arr.to(torch.float64).numpy())


def _checked(name: str, key: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "iuf" or arr.size == 0:
        raise TrafficError(f"{name}: {key} must be a non-empty numeric array, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or arr.min() < 0:
        raise TrafficError(f"{name}: {key} must hold finite, non-negative token counts")
    return arr


def _window(name: str, arr: np.ndarray, window: tuple[int, int] | None) -> np.ndarray:
    """The steps FIRST..LAST (0-based, inclusive) of a leading step axis; all steps if None."""
    if window is None:
        return arr
    first, last = window
    if not 0 <= first <= last < arr.shape[0]:
        raise TrafficError(f"{name}: window {first}:{last} is outside its steps 0..{arr.shape[0] - 1}")
    return arr[first:last + 1]
