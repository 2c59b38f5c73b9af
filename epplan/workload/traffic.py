"""Expected routing traffic of one training step: token-assignments per layer x source rank x expert.

Shape legend: L = MoE layers of the model, G = ranks (GPUs), E = routed experts per layer;
L_f, S = layers and source ranks of a routing file.

Volume and pattern come from different places. The volume is the model config's: data
parallelism over all G ranks gives each rank ``tokens_per_step / G`` tokens per step (not
necessarily an integer: these are expectations), and each token makes ``top_k`` assignments, so
every row ``counts[l, g, :]`` sums to ``tokens_per_step / G * top_k``. The pattern (how a rank's
assignments spread over the experts) comes from the spec:

- ``uniform``: every expert gets the same share.
- ``zipf:ALPHA``: the expert of popularity rank r (1-based) gets a share proportional to
  1 / r**ALPHA; which expert holds which rank is a seeded random permutation, drawn anew per
  layer; every source rank has the same distribution.
- ``coact:SIZE:SHARE[:ALPHA]``: synthetic correlated top-k with pair counts (``epplan.workload.coact``):
  experts in seeded random groups of SIZE, a token's further experts drawn from its first
  expert's group with probability SHARE, popularity zipf:ALPHA (default 0: none).
- ``PATH.npz[@FIRST:LAST]``: ``counts[..., layer, source, expert]``; a leading iteration axis is
  averaged over the iterations whose numbers (the file's ``iterations`` array, else 0, 1, ...)
  lie in FIRST..LAST inclusive; ``@N`` means N:N. Default: all iterations.
- ``drift:KEY=VALUE,...[@FIRST:LAST]``: zipf shares whose expert order rotates and whose
  exponent changes with the step, averaged over steps FIRST..LAST (``epplan.workload.drift``).
- ``PATH.json``: routing statistics written by ``epplan run`` (``epplan.workload.routing_stats``).
- ``PATH.npy|.npz|.pt[@FIRST:LAST]``: a plain [L, E] / [L, S, E] / [W, L, S, E] array, or the
  records SGLang, vLLM and Megatron-Core write (``epplan.workload.routing_import``).

Fitting a file to the problem (every adjustment is reported in ``Traffic.notes``):

- experts: the file's expert count must equal the model's, else ``TrafficError``.
- layers: model MoE layer l uses file layer l mod L_f, i.e. the first L layers when the file has
  more, repeated cyclically when it has fewer. A routing pattern is layer-specific but not
  model-specific, and planning a trace of another model is a legitimate what-if.
- sources: with G = m * S, file source s covers ranks s*m .. s*m+m-1 (replicated); with
  S = m * G, rank g pools file sources g*m .. g*m+m-1; otherwise rank g takes file source
  floor(g * S / G). Each rank's pattern is then normalised and scaled to the config's volume.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from epplan.errors import param, TrafficError
from epplan.workload.coact import SAMPLE_TOKENS, coact_statistics, parse_coact
from epplan.workload.drift import MAX_STEP as MAX_DRIFT_STEP
from epplan.workload.drift import PREFIX as DRIFT_PREFIX
from epplan.workload.drift import parse_drift
from epplan.workload.config import ModelConfig
from epplan.workload.routing_import import SUFFIXES as IMPORT_SUFFIXES
from epplan.workload.routing_import import load_counts_file
from epplan.workload.routing_stats import read_routing_stats

MAX_DRIFT_WINDOW = 100_000  # steps averaged by one drift window
MAX_TRACE_BYTES = 4 << 30  # uncompressed arrays of one .npz routing trace
SPEC_FORMS = ("'uniform', 'zipf:ALPHA', 'coact:SIZE:SHARE[:ALPHA]', 'drift:KEY=VALUE,...[@FIRST:LAST]', "
              "'PATH.npz[@FIRST:LAST]', 'PATH.json', or an array or "
              "framework record (.npy, .npz, .pt; see epplan.workload.routing_import)")


@dataclass
class Traffic:
    """Expected token-assignments of one training step.

    counts: float64[L, G, E], counts[l, g, e] = assignments source rank g sends to expert e in
            MoE layer l; each row counts[l, g, :] sums to tokens_per_step / G * top_k.
    source: what the pattern came from, for humans ("zipf:1.2 (seed 0)", "counts.npz@991:1001").
    notes:  how the spec was fitted to the problem (rescaling, layer mapping), one line each.
    pairs:  float64[L, G, E, E] or None: pairs[l, g, i, j] = tokens of rank g that selected both
            experts i < j (upper triangle, zeros on and below the diagonal), on the same scale as
            counts; possibly a view broadcast over ranks. None: the source has no pair counts
            (hierarchical dispatch then assumes independent co-occurrence, ``cost.dispatch``).
    """

    counts: np.ndarray
    source: str
    notes: list[str] = field(default_factory=list)
    pairs: np.ndarray | None = None

    @property
    def num_layers(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_ranks(self) -> int:
        return int(self.counts.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[2])

    def expert_load(self) -> np.ndarray:
        """float64[L, E]: assignments each expert receives from all ranks."""
        return self.counts.sum(axis=1)


def make_traffic(
    spec: str,
    config: ModelConfig,
    num_ranks: int,
    *,
    seed: int = 0,
    window: tuple[int, int] | None = None,
) -> Traffic:
    """Build the expected per-step ``Traffic`` of ``config`` on ``num_ranks`` ranks from ``spec``.

    ``spec`` takes one of the forms in the module docstring. ``seed`` drives the zipf expert
    order; ``window`` = (first, last) iteration numbers, inclusive, for a ``.npz`` with an
    iteration axis (same as ``@first:last`` in the spec; give one or the other).
    Returns counts of shape [config.num_moe_layers, num_ranks, config.num_experts].
    """
    if not isinstance(num_ranks, int) or isinstance(num_ranks, bool) or num_ranks < 1:
        raise TrafficError(f"number of ranks must be a positive integer, got {num_ranks!r}")
    spec = str(spec).strip()
    row_total = config.tokens_per_step / num_ranks * config.top_k
    shape = (config.num_moe_layers, num_ranks, config.num_experts)

    if spec == "uniform":
        if window is not None:
            raise TrafficError("a window applies to .npz traces only, not to 'uniform'")
        counts = np.full(shape, row_total / config.num_experts)
        return Traffic(counts, source="uniform")
    if spec == "zipf" or spec.startswith("zipf:"):
        if window is not None:
            raise TrafficError("a window applies to .npz traces only, not to zipf")
        alpha = _parse_alpha(spec)
        pattern = zipf_pattern(alpha, config.num_moe_layers, config.num_experts, seed)
        counts = np.broadcast_to(pattern[:, None, :] * row_total, shape).copy()
        notes = []
        if pattern.max() > 1 / config.top_k:
            notes.append(f"zipf:{alpha:g} sends {pattern.max():.0%} of assignments to one expert, "
                         f"more than top-{config.top_k} routing can (at most {1 / config.top_k:.0%}); "
                         "kept as asked")
        return Traffic(counts, source=f"zipf:{alpha:g} (seed {seed})", notes=notes)

    if spec.startswith("coact"):
        if window is not None:
            raise TrafficError("a window applies to .npz traces only, not to coact")
        params = parse_coact(spec)
        if params.group_size > config.num_experts:
            raise TrafficError(f"traffic spec {spec!r}: SIZE {params.group_size} exceeds the model's "
                               f"{config.num_experts} experts")
        share, pairs = coact_statistics(params, config.num_moe_layers, config.num_experts, config.top_k, seed)
        counts = np.broadcast_to(share[:, None, :] * row_total, shape).copy()
        tokens = config.tokens_per_step / num_ranks
        pairs = np.broadcast_to((pairs * tokens)[:, None], shape + (config.num_experts,))
        return Traffic(counts, source=f"{params.spec} (seed {seed})", pairs=pairs,
                       notes=[f"{params.spec}: counts and pair counts of {SAMPLE_TOKENS:,} sampled tokens "
                              "per layer, scaled to the model's volume; every rank routes alike"])
    if spec.startswith(DRIFT_PREFIX):
        return _drift_traffic(spec, config, shape, row_total, seed, window)

    path_str, window = _split_window(spec, window)
    path = Path(path_str)
    imported: list[str] = []
    file_pairs = None
    if path.suffix == ".npz" and _is_trace(path):
        file_counts, source = _load_npz(path, window)
    elif path.suffix in IMPORT_SUFFIXES:
        file_counts, source, imported = load_counts_file(path, window)
    elif path.suffix == ".json":
        if window is not None:
            raise TrafficError(f"{path.name}: a window applies to .npz traces only; "
                               "routing statistics files are already summed over their steps")
        file_counts, file_pairs, source = _load_json(path)
    else:
        raise TrafficError(f"traffic spec {spec!r} not understood; use {SPEC_FORMS}")
    counts, notes = fit_counts(file_counts, config, num_ranks, name=path.name)
    pairs = None if file_pairs is None else fit_pairs(file_pairs, file_counts, counts)
    return Traffic(counts, source=source, notes=imported + notes, pairs=pairs)


def _drift_traffic(spec: str, config: ModelConfig, shape: tuple[int, int, int], row_total: float,
                   seed: int, window: tuple[int, int] | None) -> Traffic:
    body, at, text = spec.rpartition("@")
    if not at:
        body = spec
    else:
        match = _WINDOW.match(text.strip())
        if not match:
            raise TrafficError(f"routing {spec!r}: window {text!r} must be FIRST:LAST or N (steps), "
                               "e.g. drift:alpha=1.2,rotate=500@0:999")
        first = int(match.group(1))
        got = (first, int(match.group(2)) if match.group(2) is not None else first)
        if window is not None and tuple(window) != got:
            raise TrafficError(f"routing {spec!r} has a window and another one was given; give it once")
        window = got
    first, last = window if window is not None else (0, 0)
    if not 0 <= first <= last <= MAX_DRIFT_STEP or last - first >= MAX_DRIFT_WINDOW:
        raise TrafficError(f"routing {spec!r}: window {first}:{last} must have 0 <= FIRST <= LAST <= "
                           f"{MAX_DRIFT_STEP:,} and at most {MAX_DRIFT_WINDOW:,} steps")
    drift = parse_drift(body)
    pattern = drift.shares(config.num_moe_layers, config.num_experts, first, last, seed)
    counts = np.broadcast_to(pattern[:, None, :] * row_total, shape).copy()
    return Traffic(counts, source=f"{drift.describe()}@{first}:{last} (seed {seed})")


def zipf_pattern(alpha: float, num_layers: int, num_experts: int, seed: int = 0) -> np.ndarray:
    """float64[L, E]: per layer, shares p_e proportional to 1 / rank(e)**alpha, summing to 1.

    The expert of popularity rank 1 is a seeded random one, drawn anew for each layer.
    """
    assert alpha > 0
    rng = np.random.default_rng(seed)
    by_rank = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** alpha
    by_rank /= by_rank.sum()
    pattern = np.empty((num_layers, num_experts))
    for layer in range(num_layers):
        pattern[layer, rng.permutation(num_experts)] = by_rank
    return pattern


def fit_counts(
    file_counts: np.ndarray,
    config: ModelConfig,
    num_ranks: int,
    *,
    name: str = "routing file",
) -> tuple[np.ndarray, list[str]]:
    """Fit a file's per-step counts float64[L_f, S, E] to the problem; see the module docstring.

    Returns (float64[L, G, E] with every row summing to tokens_per_step / G * top_k, notes).
    """
    num_file_layers, num_sources, num_experts = file_counts.shape
    notes: list[str] = []
    if num_experts != config.num_experts:
        raise TrafficError(
            f"{name}: has {num_experts} experts per layer, model {config.name!r} has "
            f"{config.num_experts}; use a model with {param('set', f'num_experts={num_experts}')} "
            "or routing statistics of this model")

    num_layers = config.num_moe_layers
    if num_file_layers != num_layers:
        how = (f"uses the first {num_layers}" if num_file_layers > num_layers
               else "repeats them cyclically (model layer l <- file layer l mod "
                    f"{num_file_layers})")
        notes.append(f"{name} has {num_file_layers} MoE layers, model {config.name!r} has "
                     f"{num_layers}: {how}; to use the file's layers as they are, set the model's "
                     f"num_layers={config.num_dense_layers + num_file_layers}")
    layers = file_counts[np.arange(num_layers) % num_file_layers]  # [L, S, E]

    if num_ranks == num_sources:
        per_rank = layers
    elif num_ranks % num_sources == 0:
        m = num_ranks // num_sources
        per_rank = np.repeat(layers, m, axis=1)
        notes.append(f"{name} has {num_sources} source ranks, planning for {num_ranks}: each file "
                     f"source's pattern is replicated to {m} ranks")
    elif num_sources % num_ranks == 0:
        m = num_sources // num_ranks
        per_rank = layers.reshape(num_layers, num_ranks, m, num_experts).sum(axis=2)
        notes.append(f"{name} has {num_sources} source ranks, planning for {num_ranks}: each rank "
                     f"takes the pooled pattern of {m} file sources")
    else:
        a2s = (np.arange(num_ranks) * num_sources) // num_ranks  # rank -> file source
        per_rank = layers[:, a2s, :]
        notes.append(f"{name} has {num_sources} source ranks, planning for {num_ranks}: rank g takes "
                     f"the pattern of file source floor(g * {num_sources} / {num_ranks})")

    row_sums = per_rank.sum(axis=2, keepdims=True)  # [L, G, 1]
    is_empty = row_sums[..., 0] == 0
    if np.any(is_empty):
        # A rank with no recorded assignments in a layer takes the layer's mean pattern.
        layer_mean = per_rank.sum(axis=1)  # [L, E]
        if np.any(layer_mean.sum(axis=1) == 0):
            bad = int(np.flatnonzero(layer_mean.sum(axis=1) == 0)[0])
            raise TrafficError(f"{name}: layer {bad % num_file_layers} has no assignments at all; "
                               "a routing file needs counts in every layer")
        per_rank = np.where(is_empty[..., None], layer_mean[:, None, :], per_rank)
        row_sums = per_rank.sum(axis=2, keepdims=True)
        notes.append(f"{name}: {int(is_empty.sum())} (layer, rank) rows had no assignments and "
                     "take their layer's mean pattern")

    row_total = config.tokens_per_step / num_ranks * config.top_k
    file_row = float(file_counts.sum(axis=2).mean())
    if not math.isclose(file_row, row_total, rel_tol=1e-9):
        notes.append(f"{name} gives {file_row:,.6g} assignments per source rank and layer; "
                     f"model {config.name!r} on {num_ranks} ranks gives {row_total:,.6g} "
                     f"(scale x{row_total / file_row:.4g}): the file sets the pattern, "
                     "the model the volume")
    counts = per_rank / row_sums * row_total
    return counts, notes


def fit_pairs(file_pairs: np.ndarray, file_counts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """float64[L, G, E, E] pair counts fitted as ``fit_counts`` fitted ``file_counts`` (float64[L_f,
    S, E]) to ``counts`` (float64[L, G, E]): the same layers and sources, each (layer, rank)
    scaled by the factor its counts were scaled by (pairs are tokens, counts assignments of the
    same tokens); a rank that took its layer's mean pattern takes the layer's pooled pairs."""
    num_file_layers, num_sources = file_counts.shape[:2]
    num_layers, num_ranks = counts.shape[:2]
    layer_of = np.arange(num_layers) % num_file_layers
    if num_ranks % num_sources == 0:
        groups = [[g // (num_ranks // num_sources)] for g in range(num_ranks)]
    elif num_sources % num_ranks == 0:
        m = num_sources // num_ranks
        groups = [list(range(g * m, g * m + m)) for g in range(num_ranks)]
    else:
        groups = [[g * num_sources // num_ranks] for g in range(num_ranks)]
    out = np.empty(counts.shape + counts.shape[2:])
    for li, lf in enumerate(layer_of):
        pooled_pairs, pooled = file_pairs[lf].sum(axis=0), file_counts[lf].sum()
        for g, members in enumerate(groups):
            raw = file_counts[lf, members].sum()
            pairs, total = (file_pairs[lf, members].sum(axis=0), raw) if raw > 0 else (pooled_pairs, pooled)
            out[li, g] = pairs * (counts[li, g].sum() / total)
    return out


def _parse_alpha(spec: str) -> float:
    head, _, value = spec.partition(":")
    if head != "zipf" or not value:
        raise TrafficError(f"traffic spec {spec!r} not understood; write zipf:ALPHA, e.g. zipf:1.2")
    try:
        alpha = float(value)
    except ValueError:
        raise TrafficError(f"traffic spec {spec!r}: ALPHA must be a number, e.g. zipf:1.2") from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise TrafficError(f"traffic spec {spec!r}: ALPHA must be > 0 (use 'uniform' for no skew)")
    return alpha


_WINDOW = re.compile(r"^(-?\d+)(?::(-?\d+))?$")


def _split_window(
    spec: str, window: tuple[int, int] | None,
) -> tuple[str, tuple[int, int] | None]:
    """'path.npz@991:1001' -> ('path.npz', (991, 1001)); an '@' elsewhere belongs to the path."""
    path_str, at, text = spec.rpartition("@")
    match = _WINDOW.match(text.strip())
    if not at or (not match and not path_str.endswith((".json",) + IMPORT_SUFFIXES)):
        return spec, window
    if not match:
        raise TrafficError(f"traffic spec {spec!r}: window {text!r} must be FIRST:LAST or N "
                           "(inclusive iteration numbers), e.g. counts.npz@991:1001")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if window is not None and tuple(window) != (first, last):
        raise TrafficError(f"traffic spec {spec!r} has a window and another one was given "
                           f"({window[0]}:{window[1]}); give it once")
    return path_str, (first, last)


def _is_trace(path: Path) -> bool:
    """A SmartMoE-style trace: an .npz with a 'counts' array (else a plain-array .npz)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return True  # an .npy named .npz: the trace reader says so
        with loaded as data:
            return "counts" in data.files
    except Exception:  # a bad zip, a directory, ...: let the trace reader report the file
        return True


def _load_npz(path: Path, window: tuple[int, int] | None) -> tuple[np.ndarray, str]:
    """float64[L_f, S, E] per-step counts from a trace, averaged over the window's iterations."""
    if not path.exists():
        raise TrafficError(f"{path}: routing trace not found")
    if not path.is_file():
        raise TrafficError(f"{path}: not a regular file; give a .npz routing trace")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise AttributeError("an .npy array")
        with loaded as data:
            sizes = {info.filename: info.file_size for info in data.zip.infolist()}
            if sum(sizes.values()) > MAX_TRACE_BYTES:  # before decompressing anything
                raise ValueError(f"its arrays hold {sum(sizes.values()):,} bytes, more than "
                                 f"{MAX_TRACE_BYTES:,}")
            arrays = {k: data[k] for k in data.files}
    except AttributeError:  # np.load returned an ndarray
        raise TrafficError(f"{path.name}: not a .npz file but a single .npy array; save the trace "
                           "with np.savez(path, counts=...)") from None
    except Exception as exc:  # a bad zip, a truncated member, a pickled object, ...
        raise TrafficError(f"{path.name}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if "counts" not in arrays:
        raise TrafficError(f"{path.name}: no 'counts' array (found: {', '.join(arrays) or 'none'}); "
                           "expected counts[iteration, layer, source, expert]")
    counts = arrays["counts"]
    if counts.dtype.kind not in "iuf" or counts.ndim not in (3, 4) or 0 in counts.shape:
        raise TrafficError(f"{path.name}: counts must be a numeric [iteration,] layer, source, expert "
                           f"array, got {counts.dtype} of shape {counts.shape}")
    counts = counts.astype(np.float64)
    if not np.all(np.isfinite(counts)) or counts.min() < 0:
        raise TrafficError(f"{path.name}: counts must be finite and non-negative")
    if counts.ndim == 3:
        if window is not None:
            raise TrafficError(f"{path.name}: counts has no iteration axis, so a window "
                               f"{window[0]}:{window[1]} does not apply; drop it")
        return counts, path.name

    iterations = arrays.get("iterations", np.arange(counts.shape[0]))
    if iterations.shape != (counts.shape[0],):
        raise TrafficError(f"{path.name}: 'iterations' has shape {iterations.shape}, expected "
                           f"({counts.shape[0]},), one number per row of counts")
    if window is None:
        return counts.mean(axis=0), f"{path.name} (all {counts.shape[0]} iterations)"
    first, last = window
    is_in = (iterations >= first) & (iterations <= last)
    if not is_in.any():
        raise TrafficError(f"{path.name}: no iteration in window {first}:{last}; the file has "
                           f"iterations {int(iterations.min())}..{int(iterations.max())}")
    return (counts[is_in].mean(axis=0),
            f"{path.name}@{first}:{last} ({int(is_in.sum())} iterations)")


def _load_json(path: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(float64[L_f, S, E] per-step counts, float64[L_f, S, E, E] per-step pairs or None: a
    version 1 file, or one recorded without them) from routing statistics."""
    stats = read_routing_stats(path)
    source = f"{path.name} (model {stats.model!r}, {stats.steps} steps)"
    pairs = None if stats.pairs is None else stats.pairs.astype(np.float64) / stats.steps
    return stats.per_step(), pairs, source
