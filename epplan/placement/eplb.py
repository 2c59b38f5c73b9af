"""DeepSeek's Expert Parallelism Load Balancer (EPLB), its published policy, in numpy.

Written from DeepSeek's description and reference implementation (github.com/deepseek-ai/EPLB,
``rebalance_experts``) so that epplan can score EPLB's placements exactly as vLLM, SGLang and
DeepSeek run it, without torch; the tests reproduce the worked example of its README digit for
digit. Nothing here knows the topology beyond node and GPU counts: that is EPLB.

Policy (``rebalance_experts``): when the number of expert groups divides by the number of nodes,
the *hierarchical* policy: (1) pack the groups onto nodes, equal numbers of groups per node,
balancing load (heaviest first onto the lightest node with room); (2) inside each node replicate
its experts to ``num_replicas / num_nodes`` physical experts, each extra replica to the expert with
the highest load per replica; (3) pack the node's physical experts onto its GPUs, equal numbers
per GPU, balancing load. Otherwise the *global* policy: the same with one group and one node.
Models without group-limited routing have one group, so they take the global path (as vLLM and
SGLang call it), and so does DeepSeek-V3 (8 groups) on more than 8 nodes or on 3, 5, 6, 7.

Ties break as in the reference: sorts are stable (heaviest first, lower index first among equal
loads), and the lightest pack and the heaviest expert are the first in index order.

Shape legend: L = MoE layers, E = logical experts, P = physical experts (replicas), X = the most
replicas any expert has.
"""

from __future__ import annotations

import numpy as np


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's entry point.

    weight:       float[L, E] load statistics of every logical expert.
    num_replicas: P, physical experts; a multiple of ``num_gpus``, at least E.
    num_groups:   expert groups (1 for models without group-limited routing); divides E.
    num_nodes:    nodes; divides ``num_gpus``.
    Returns (phy2log int64[L, P]: the logical expert of each physical slot, slots g * P / G ..
    (g + 1) * P / G - 1 on GPU g; log2phy int64[L, E, X]: the physical slots of each expert, -1
    padded, column = replica rank; logcnt int64[L, E]: replicas per expert).
    """
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 2:
        raise ValueError(f"weight must be [layers, experts], got shape {weight.shape}")
    num_layers, num_experts = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    width = int(logcnt.max())
    log2phy = np.full((num_layers, num_experts, width), -1, dtype=np.int64)
    layer = np.repeat(np.arange(num_layers), num_replicas)
    log2phy[layer, phy2log.ravel(), phyrank.ravel()] = np.tile(np.arange(num_replicas), num_layers)
    return phy2log, log2phy, logcnt


def is_hierarchical(num_groups: int, num_nodes: int) -> bool:
    """Whether ``rebalance_experts`` takes the hierarchical path."""
    return num_groups % num_nodes == 0


# ---------------------------------------------------------------------------------------------

def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack each row's n items into ``num_packs`` packs of n / num_packs items, heaviest first
    onto the lightest pack with room. weight: float[X, n]. Returns (pack int64[X, n], rank in
    pack int64[X, n])."""
    rows, n = weight.shape
    assert n % num_packs == 0, (n, num_packs)
    per_pack = n // num_packs
    if per_pack == 1:
        return np.tile(np.arange(n), (rows, 1)), np.zeros((rows, n), dtype=np.int64)
    pack = np.full((rows, n), -1, dtype=np.int64)
    rank = np.full((rows, n), -1, dtype=np.int64)
    for i in range(rows):
        load = np.zeros(num_packs)
        items = np.zeros(num_packs, dtype=np.int64)
        for item in np.argsort(-weight[i], kind="stable"):
            room = np.flatnonzero(items < per_pack)
            p = int(room[np.argmin(load[room])])
            pack[i, item], rank[i, item] = p, items[p]
            load[p] += weight[i, item]
            items[p] += 1
    return pack, rank


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicate each row's experts to ``num_phy`` physical ones: each extra replica to the expert
    with the highest load per replica. weight: float[X, n]. Returns (phy2log int64[X, num_phy],
    replica rank int64[X, num_phy], logcnt int64[X, n])."""
    rows, num_log = weight.shape
    assert num_phy >= num_log, (num_phy, num_log)
    phy2log = np.tile(np.arange(num_phy), (rows, 1))
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, num_log), dtype=np.int64)
    every = np.arange(rows)
    for i in range(num_log, num_phy):
        hot = np.argmax(weight / logcnt, axis=1)
        phy2log[:, i] = hot
        rank[:, i] = logcnt[every, hot]
        logcnt[every, hot] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    num_layers, num_log = weight.shape
    assert num_log % num_groups == 0 and num_groups % num_nodes == 0
    assert num_gpus % num_nodes == 0 and num_phy % num_gpus == 0
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_phy // num_gpus
    log_per_node = num_log // num_nodes

    # 1. groups -> nodes; log2mlog numbers the experts node-major ("meta-logical" ids).
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(axis=-1)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    first = (group_pack * groups_per_node + group_rank) * group_size                 # [L, groups]
    log2mlog = (first[:, :, None] + np.arange(group_size)).reshape(num_layers, num_log)
    mlog2log = _inverse(log2mlog)

    # 2. replicas inside each node: rows are (layer, node).
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, log_per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, num_phy // num_nodes)

    # 3. the node's physical experts -> its GPUs.
    phy_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, axis=1)
    pack, rank = balanced_packing(phy_load, num_gpus // num_nodes)
    phy2pphy = pack * per_gpu + rank
    pphy2phy = _inverse(phy2pphy)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    offset = np.arange(0, num_log, log_per_node).reshape(1, -1, 1)
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, -1) + offset).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt
