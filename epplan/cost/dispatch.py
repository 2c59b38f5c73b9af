"""Hierarchical (node-deduplicated) dispatch: the rows it sends, predicted and put on links.

Shape legend: G = ranks (GPUs), N = nodes, E = experts per layer, K = links, T = tokens,
k = experts per token (top-k), H = experts present on one node or GPU.

Flat dispatch sends one row (a token's d_model vector) per (token, expert assignment).
Hierarchical dispatch, as ``epplan run --dispatch hierarchical`` runs it, sends for every token t
of source rank s, whose assignments land on the GPUs D(t) (replicas chosen by the manifest's
per-source split, exactly as flat dispatch chooses them):

- over the network, ONE row s -> p(s, n) for every node n != node(s) that holds a GPU of D(t);
  p(s, n) = ``rail_peers(...)[s, n]``, the GPU of node n with s's local index (one NIC hop, as
  NCCL's PXN); for n = node(s), p = s and nothing crosses the network;
- inside node n, ONE row p(s, n) -> g for every g in D(t) on n other than p(s, n);
- combine: the same rows in the opposite direction (each GPU sums its experts' outputs of the
  token, the rail peer sums over its node).

So per layer, exchange and source two tables say everything:

    node_rows[s, n]: distinct (token of s, node n) pairs with an assignment on n (node(s) included);
    gpu_rows[s, g]:  distinct (token of s, GPU g) pairs with an assignment on g (g = s included).

``hierarchical_link_loads`` puts them on the links (network s -> p(s, n): node_rows[s, n] for
n != node(s); intra-node p(s, n) -> g: gpu_rows[s, g] for g != p(s, n)), through the same
``LinkMap`` as flat traffic, so the two agree on every path. With measured rows it is exact.

Prediction (``hierarchical_rows``) from counts[s, e] (assignments) and pairs[s, i, j] (tokens of s
that selected both i < j). The runtime picks replicas by position: the j-th assignment of s to e
(flat order) goes to the replica whose block of the split holds j, i.e. a token at relative
position u of s's batch goes to the replica r of e with lo[e, r] <= u < hi[e, r] (the split's
cumulative shares). Taking a token's relative position among the assignments to each of its
experts as the same u (routing that does not drift inside a batch), for a set S of GPUs (a node,
or one GPU) and m(t) = the number of t's assignments landing in S, summed over s's tokens

    c_S = sum_e counts[s, e] |B_e|,       q_S = sum_{i<j} pairs[s, i, j] |B_i & B_j|,

with B_e = the positions u whose replica of e is in S (|B_e| = e's share served in S; for an
expert without replicas 0 or 1). Then c_S = sum_t m(t), q_S = sum_t C(m(t), 2), and the rows are
rows_S = #{t : m(t) >= 1} = c_S - q_S + (triples) - ... (inclusion-exclusion).

- Exact: rows_S = c_S - q_S whenever m(t) <= 2 for every token: top-2, or at most two experts in
  S, and without replicas (no position assumption needed). This covers the seed's top-2
  placements and one expert per GPU (gpu_rows = flows).
- With replicas the position assumption is an approximation (finite batches, rounding of the
  split); its error against ``simulate_rows``, which follows the runtime's rule token by token,
  is measured by ``scripts/bench_dispatch.py`` (docs/planner.md) and bounded in tests.
- Top-k > 2 with three or more experts in S (m(t) can reach n = min(k, M), M experts in S): the
  distribution of m(t) is taken as beta-binomial over k trials with its first two moments
  matched (mu = c_S / T, E[m(m-1)] = 2 q_S / T): rows = T (1 - P[m = 0]). That family holds the
  hypergeometric distribution of independent uniform routing exactly and a clustered one
  (m either 0 or large) at the other end. The result is clipped to what the two moments allow:
  max(c - q, T mu^2 / E[m^2]) <= rows <= c - 2 q / n. Its error against per-token simulation of
  correlated top-8 routing is measured by ``scripts/bench_dispatch.py`` (docs/planner.md).
- Without pair counts (``pairs=None``: uniform, zipf, traces), a token's experts are taken to
  co-occur independently: pairs[s, i, j] = (k - 1) counts[s, i] counts[s, j] / sum_e counts[s, e].

The planner and the cost function stay free of torch: the per-token reference is numpy and follows
``epplan.runtime.expert_parallel.split_assignments`` (tests compare the two).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from epplan.placement.types import LayerPlacement

if TYPE_CHECKING:  # for the annotations only (no import cycle at run time)
    from epplan.cost.linkmap import LinkMap



# ------------------------------------------------------------------------------ rail peers

def rail_peers(gpu_node: np.ndarray, gpu_local: np.ndarray) -> np.ndarray:
    """int64[G, N]: p(s, n), the GPU of node n that receives s's network rows for n.

    The GPU of node n with s's local index; where node n has fewer GPUs, the one with local index
    ``local(s) mod (GPUs of n)`` (heterogeneous clusters). p(s, node(s)) = s.
    """
    gpu_node, gpu_local = np.asarray(gpu_node, dtype=np.int64), np.asarray(gpu_local, dtype=np.int64)
    num_nodes = int(gpu_node.max()) + 1
    peers = np.empty((gpu_node.size, num_nodes), dtype=np.int64)
    for n in range(num_nodes):
        ranks = np.flatnonzero(gpu_node == n)
        by_local = ranks[np.argsort(gpu_local[ranks], kind="stable")]
        peers[:, n] = by_local[gpu_local % ranks.size]
    peers[np.arange(gpu_node.size), gpu_node] = np.arange(gpu_node.size)
    return peers


# ------------------------------------------------------------------------------ prediction

def hierarchical_rows(counts: np.ndarray, pairs: np.ndarray | None, layer: LayerPlacement,
                      gpu_node: np.ndarray, *, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Expected (node_rows float64[G, N], gpu_rows float64[G, G]) of one layer per exchange.

    counts: float64[G, E] assignments of each source to each expert.
    pairs:  float64[G, E, E] tokens of each source that selected both i and j, upper triangle
            (i < j; zeros elsewhere), or None (independent co-occurrence, module docstring). A view
            broadcast over sources (stride 0 on axis 0) is read once.
    layer:  the placement of the layer; its per-source splits choose the replicas (by position).
    gpu_node: int64[G] node of each rank. See the module docstring for what is exact.
    """
    counts = np.asarray(counts, dtype=np.float64)
    gpu_node = np.asarray(gpu_node, dtype=np.int64)
    tokens = counts.sum(axis=1) / top_k                                   # (G,)
    on_gpu, on_node = layer_blocks(layer, gpu_node)
    sym = None if pairs is None else symmetric_pairs(pairs)
    node_rows = set_rows(counts, sym, on_node, tokens, top_k)
    gpu_rows = set_rows(counts, sym, on_gpu, tokens, top_k)
    return node_rows, gpu_rows


Blocks = list[tuple[int, np.ndarray, np.ndarray]]


def layer_blocks(layer: LayerPlacement, gpu_node: np.ndarray) -> tuple[list[Blocks], list[Blocks]]:
    """(per GPU, per node) the blocks of the split each serves: (expert e, lo float64[G], hi
    float64[G]): source s's assignments to e at relative positions in [lo[s], hi[s]) go there."""
    num_gpus, num_nodes = gpu_node.size, int(gpu_node.max()) + 1
    on_gpu: list[Blocks] = [[] for _ in range(num_gpus)]
    on_node: list[Blocks] = [[] for _ in range(num_nodes)]
    for e, (ranks, split) in enumerate(zip(layer.replicas, layer.split)):
        hi = np.cumsum(split, axis=1)                                     # (G, R_e)
        lo = hi - split
        for r, g in enumerate(np.asarray(ranks, dtype=np.int64)):
            block = (e, lo[:, r], hi[:, r])
            on_gpu[g].append(block)
            on_node[gpu_node[g]].append(block)
    return on_gpu, on_node


def symmetric_pairs(pairs: np.ndarray) -> np.ndarray:
    """float64[G, E, E] pairs + pairs^T (a broadcast input stays broadcast)."""
    pairs = np.asarray(pairs, dtype=np.float64)
    if pairs.shape[0] > 1 and pairs.strides[0] == 0:
        one = pairs[0] + pairs[0].T
        return np.broadcast_to(one, pairs.shape)
    return pairs + np.swapaxes(pairs, 1, 2)


def set_rows(counts: np.ndarray, sym: np.ndarray | None, sets: list[Blocks], tokens: np.ndarray,
             top_k: int) -> np.ndarray:
    """float64[G, S] rows of each source to each set (a node or a GPU) from the split blocks each
    set serves (``layer_blocks``): c from the blocks' lengths, q from their overlaps. counts
    float64[G, E], sym float64[G, E, E] (``symmetric_pairs``) or None, tokens float64[G]."""
    num_gpus, num_sets = counts.shape[0], len(sets)
    total = counts.sum(axis=1)                                            # (G,) = k T
    rows = np.zeros((num_gpus, num_sets))
    broadcast = sym is not None and sym.shape[0] > 1 and sym.strides[0] == 0
    for j, blocks in enumerate(sets):
        if not blocks:
            continue
        expert = np.array([b[0] for b in blocks], dtype=np.int64)         # (B,)
        lo = np.stack([b[1] for b in blocks], axis=1)                     # (G, B)
        hi = np.stack([b[2] for b in blocks], axis=1)
        cb = counts[:, expert] * (hi - lo)                                # (G, B)
        c = cb.sum(axis=1)                                                # (G,)
        num_held = np.unique(expert).size
        if num_held == 1 or top_k == 1:
            rows[:, j] = c
            continue
        # overlap[s, a, b]: share of positions where blocks a and b both serve (0 for one expert's
        # own blocks: they are disjoint, and sym's diagonal is 0).
        overlap = np.clip(np.minimum(hi[:, :, None], hi[:, None, :]) - np.maximum(lo[:, :, None], lo[:, None, :]),
                          0.0, None)                                       # (G, B, B)
        if sym is None:  # independent co-occurrence: (k-1) c_i c_j / (k T)
            cc = counts[:, expert]
            other = expert[:, None] != expert[None, :]
            q = 0.5 * (top_k - 1) * np.einsum("sa,sb,sab->s", cc, cc, overlap * other) \
                / np.where(total > 0, total, 1.0)
        elif broadcast:
            q = 0.5 * np.einsum("sab,ab->s", overlap, sym[0][np.ix_(expert, expert)])
        else:
            q = 0.5 * np.einsum("sab,sab->s", overlap, sym[:, expert][:, :, expert])
        is_max_two = num_held <= 2 or top_k <= 2
        rows[:, j] = c - q if is_max_two else union_rows(c, q, tokens, min(top_k, num_held), top_k)
    return rows


def union_rows(c: np.ndarray, q: np.ndarray, tokens: np.ndarray, n_max: int, top_k: int) -> np.ndarray:
    """Tokens with at least one assignment in a set, from c = sum_t m(t) and q = sum_t C(m(t), 2)
    (arrays of one shape), when m(t) <= n_max; beta-binomial over ``top_k`` trials, moments
    matched, clipped to the moment bounds (module docstring)."""
    c, q = np.asarray(c, dtype=np.float64), np.asarray(q, dtype=np.float64)
    t = np.broadcast_to(np.asarray(tokens, dtype=np.float64), c.shape)
    safe_t = np.where(t > 0, t, 1.0)
    mu = c / safe_t                                                       # E[m]
    f2 = 2.0 * q / safe_t                                                 # E[m (m - 1)]
    lower = np.maximum(c - q, np.where(mu > 0, t * mu ** 2 / np.where(mu + f2 > 0, mu + f2, 1.0), 0.0))
    upper = np.minimum(c - 2.0 * q / n_max, np.minimum(c, t))
    k = float(top_k)
    p = mu / k
    with np.errstate(divide="ignore", invalid="ignore"):
        qq = f2 / ((k - 1.0) * mu)                                        # (alpha + 1) / (alpha + beta + 1)
        s = (1.0 - qq) / (qq - p)                                         # alpha + beta
        beta = (1.0 - p) * s
        zero = np.ones_like(mu)
        for i in range(top_k):
            zero = zero * (beta + i) / (s + i)
        binomial = (1.0 - p) ** k
    near_binomial = ~np.isfinite(s) | (np.abs(s) > 1e12)
    zero = np.where(near_binomial, binomial, zero)
    clustered = qq >= 1.0 - 1e-12                                         # m in {0, k}: P[m > 0] = p
    zero = np.where(clustered, 1.0 - p, zero)
    # |s| < k - 1 with s < 0 is no distribution (a population smaller than the draws).
    invalid = ~np.isfinite(zero) | ((s < 0) & (s > -(k - 1)) & ~near_binomial & ~clustered)
    zero = np.where(invalid, 1.0 - (lower / safe_t), np.clip(zero, 0.0, 1.0))
    rows = np.clip(t * (1.0 - zero), lower, np.maximum(lower, upper))
    return np.where(mu > 0, rows, 0.0)


# ------------------------------------------------------------------------------ onto links

def hierarchical_traffic(node_rows: np.ndarray, gpu_rows: np.ndarray, gpu_node: np.ndarray,
                         gpu_local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(network float64[G, G], intra float64[G, G]): rows per dispatch exchange on each GPU pair.

    network[s, p(s, n)] = node_rows[s, n] for n != node(s); intra[p(s, n), g] sums gpu_rows[s, g]
    over the sources s for g on n, g != p(s, n). The combine is the transpose of both.
    """
    node_rows, gpu_rows = np.asarray(node_rows, dtype=np.float64), np.asarray(gpu_rows, dtype=np.float64)
    gpu_node = np.asarray(gpu_node, dtype=np.int64)
    num_gpus, num_nodes = node_rows.shape
    peers = rail_peers(gpu_node, gpu_local)                               # (G, N)
    network = np.zeros((num_gpus, num_gpus))
    src = np.repeat(np.arange(num_gpus), num_nodes)
    is_remote = np.arange(num_nodes)[None, :] != gpu_node[:, None]        # (G, N)
    np.add.at(network, (src[is_remote.ravel()], peers[is_remote]), node_rows[is_remote])
    relay = peers[:, gpu_node]                                            # (G, G) [s, g] = p(s, node(g))
    intra = np.zeros((num_gpus, num_gpus))
    dst = np.broadcast_to(np.arange(num_gpus), (num_gpus, num_gpus))
    is_fwd = relay != dst
    np.add.at(intra, (relay[is_fwd], dst[is_fwd]), gpu_rows[is_fwd])
    return network, intra


def hierarchical_link_loads(link_map: LinkMap, node_rows: np.ndarray, gpu_rows: np.ndarray,
                            row_bytes: float) -> tuple[np.ndarray, np.ndarray]:
    """(dispatch float64[K], combine float64[K]) bytes on each link of one hierarchical exchange pair.

    link_map: ``epplan.cost.linkmap.link_map(topology)``; node_rows float64[G, N] and gpu_rows
    float64[G, G] as in the module docstring (measured or predicted), row_bytes the bytes of one
    row. The combine carries the same rows reversed, so it is the transpose's loads.
    """
    topo = link_map.topology
    network, intra = hierarchical_traffic(node_rows, gpu_rows, topo.gpu_node, topo.gpu_local)
    fwd, bwd = link_map.pair_loads(network + intra)
    return row_bytes * fwd, row_bytes * bwd


# ------------------------------------------------------------------------------ per-token reference

def replica_choice(topk_idx: np.ndarray, source: np.ndarray, layer: LayerPlacement) -> np.ndarray:
    """int64[T, k]: the GPU each assignment goes to, as the runtime chooses it.

    topk_idx: int64[T, k] experts of each token (-1: none); source: int64[T] rank of each token,
    tokens of one source in the runtime's flat order. Per source, the j-th assignment (flat order,
    token-major) to expert e goes to the replica whose block of ``split_assignments(num, share)``
    holds j (largest-remainder rounding; ``epplan.runtime.expert_parallel``).
    """
    topk_idx, source = np.asarray(topk_idx, dtype=np.int64), np.asarray(source, dtype=np.int64)
    dest = np.full(topk_idx.shape, -1, dtype=np.int64)
    for s in np.unique(source):
        rows = np.flatnonzero(source == s)
        flat = topk_idx[rows].ravel()
        is_valid = flat >= 0
        out = np.full(flat.size, -1, dtype=np.int64)
        for e in np.unique(flat[is_valid]):
            at = np.flatnonzero(flat == e)                                # flat order
            num = split_counts(at.size, layer.split[e][s])
            replica = np.searchsorted(np.cumsum(num), np.arange(at.size), side="right")
            out[at] = layer.replicas[e][replica]
        dest[rows] = out.reshape(rows.size, -1)
    return dest


def split_counts(num: int, shares: np.ndarray) -> np.ndarray:
    """int64[R]: ``num`` assignments over replicas by largest remainder, as the runtime rounds."""
    shares = np.asarray(shares, dtype=np.float64)
    quota = shares * num
    base = np.floor(quota)
    frac = np.where(shares > 0, quota - base, -1.0)
    short = int(num - base.sum())
    order = np.argsort(-frac, kind="stable")
    out = base.astype(np.int64)
    out[order[:short]] += (shares[order[:short]] > 0)
    out[int(np.argmax(shares))] += num - int(out.sum())
    return out


def simulate_rows(topk_idx: np.ndarray, source: np.ndarray, layer: LayerPlacement, gpu_node: np.ndarray,
                  num_ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """(node_rows int64[G, N], gpu_rows int64[G, G]) counted token by token: the reference.

    topk_idx int64[T, k], source int64[T] as in ``replica_choice``.
    """
    gpu_node = np.asarray(gpu_node, dtype=np.int64)
    num_nodes = int(gpu_node.max()) + 1
    dest = replica_choice(topk_idx, source, layer)                        # (T, k)
    source = np.asarray(source, dtype=np.int64)
    num_tokens, top_k = dest.shape
    token = np.repeat(np.arange(num_tokens), top_k)
    d = dest.ravel()
    is_valid = d >= 0
    gpu_keys = np.unique(token[is_valid] * num_ranks + d[is_valid])      # distinct (token, GPU)
    node_keys = np.unique(token[is_valid] * num_nodes + gpu_node[d[is_valid]])
    gpu_rows = np.zeros((num_ranks, num_ranks), dtype=np.int64)
    np.add.at(gpu_rows, (source[gpu_keys // num_ranks], gpu_keys % num_ranks), 1)
    node_rows = np.zeros((num_ranks, num_nodes), dtype=np.int64)
    np.add.at(node_rows, (source[node_keys // num_nodes], node_keys % num_nodes), 1)
    return node_rows, gpu_rows


def token_statistics(topk_idx: np.ndarray, source: np.ndarray, num_ranks: int,
                     num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts int64[G, E], pairs int64[G, E, E] upper triangle) of tokens, as ``run`` records them."""
    topk_idx, source = np.asarray(topk_idx, dtype=np.int64), np.asarray(source, dtype=np.int64)
    counts = np.zeros((num_ranks, num_experts), dtype=np.int64)
    pairs = np.zeros((num_ranks, num_experts, num_experts), dtype=np.int64)
    top_k = topk_idx.shape[1]
    for a in range(top_k):
        ea = topk_idx[:, a]
        ok = ea >= 0
        np.add.at(counts, (source[ok], ea[ok]), 1)
        for b in range(a + 1, top_k):
            eb = topk_idx[:, b]
            ok2 = ok & (eb >= 0)
            lo, hi = np.minimum(ea, eb)[ok2], np.maximum(ea, eb)[ok2]
            np.add.at(pairs, (source[ok2], lo, hi), 1)
    return counts, pairs
