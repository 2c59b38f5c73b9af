"""Slow references for the traffic -> link-load map (``epplan.cost.linkmap``), for tests only.

``reference_pair`` walks the topology graph for one pair, independently of the path model's
tables; ``reference_link_loads`` applies the path model's tables to a dense matrix in a
different order than the fast map (per receiving NIC, all at once).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from epplan.topology.paths import ecmp_fractions


def reference_pair(topo, s: int, t: int) -> dict[int, float]:
    """{link index: fraction} of one unit s -> t, composed directly from the graph (ECMP over
    the server and fabric subgraphs, PXN by rail), one pair at a time; slow."""
    g = topo.graph
    kinds = dict(g.nodes(data="kind"))
    src, dst = topo.gpu_names[s], topo.gpu_names[t]
    ns, nt = int(topo.gpu_node[s]), int(topo.gpu_node[t])

    def server(n, keep):
        devs = {d for d, k in kinds.items() if g.nodes[d].get("node") == n and k not in ("gpu", "nic")}
        devs |= keep
        return {u: [v for v in g.successors(u) if v in devs] for u in devs}

    def seg(n, a, b, keep=frozenset()):
        return ecmp_fractions(server(n, {a, b} | set(keep)), a, b)

    def nics(n):
        return {g.nodes[d]["rail"]: d for d, k in kinds.items() if k == "nic" and g.nodes[d]["node"] == n}

    def proxy(nic):
        return {f"{nic.rsplit('/', 1)[0]}/gpu{g.nodes[nic]['gpu']}"}

    def near(n, gpu):
        lengths = {r: sum(seg(n, gpu, nic, proxy(nic)).values()) for r, nic in nics(n).items()}
        best = min(lengths.values())
        return [nics(n)[r] for r, v in lengths.items() if abs(v - best) < 1e-9]

    total = {}

    def add(fr, w):
        for e, f in fr.items():
            idx = g.edges[e]["idx"]
            total[idx] = total.get(idx, 0.0) + w * f

    if ns == nt:
        add(seg(ns, src, dst), 1.0)
        return total
    switches = {d for d in kinds if g.nodes[d].get("node") is None}
    recv = near(nt, dst)
    for nic_b in recv:
        wb = 1.0 / len(recv)
        rail = g.nodes[nic_b]["rail"]
        if topo.routing == "rail_aligned" and rail in nics(ns):
            senders = [nics(ns)[rail]]
        else:
            senders = near(ns, src)
        for nic_a in senders:
            w = wb / len(senders)
            add(seg(ns, src, nic_a, proxy(nic_a)), w)
            fab = {u: [v for v in g.successors(u) if v in switches | {nic_b}] for u in switches | {nic_a}}
            add(ecmp_fractions(fab, nic_a, nic_b), w)
            add(seg(nt, nic_b, dst, proxy(nic_b)), w)
    return total


def reference_link_loads(topo, traffic) -> np.ndarray:
    """float64[L] load on every directed link for traffic[s, t]: the path tables applied to the
    dense matrix, all NICs at once (O(G^2 C)), written apart from ``epplan.cost.linkmap``.

    ``traffic`` is float[G, G] (dense or scipy sparse); its diagonal (a GPU to itself) is
    ignored.
    """
    pm = topo.paths
    node_of_gpu = sp.csr_matrix(
        (np.ones(pm.num_gpus), (topo.gpu_node, np.arange(pm.num_gpus))), shape=(topo.num_nodes, pm.num_gpus))
    if sp.issparse(traffic):
        traffic = traffic.toarray()
    traffic = np.asarray(traffic, dtype=np.float64)
    num_gpus, num_rails = pm.num_gpus, pm.num_rails
    assert traffic.shape == (num_gpus, num_gpus), traffic.shape
    loads = pm.intra.T @ traffic[pm.intra_src, pm.intra_dst]
    if pm.num_nics == 0 or topo.num_nodes == 1:
        return loads
    cross = traffic.copy()
    cross[pm.intra_src, pm.intra_dst] = 0.0
    np.fill_diagonal(cross, 0.0)
    # (G, G) @ (G, C): what each source sends to each receiving NIC
    to_nic = (pm.recv_near.T @ cross.T).T
    if pm.routing == "rail_aligned":
        send_nic = pm.node_rail_nic[:, pm.nic_rail]                       # (N, C) sending NIC, -1 if none
        matched = (send_nic[topo.gpu_node] >= 0)          # (G, C)
        to_nic_m = np.where(matched, to_nic, 0.0)
        to_nic_u = to_nic - to_nic_m
        per_node = node_of_gpu @ to_nic_m                 # (N, C)
        nic2nic = np.zeros((pm.num_nics, pm.num_nics))
        a, q = np.nonzero(send_nic >= 0)
        np.add.at(nic2nic, (send_nic[a, q], q), per_node[a, q])
        nic2nic += (pm.send_near.T @ to_nic_u)
        sent = (pm.nic_rail_onehot.T @ to_nic_m.T).T        # (G, R) by the receiving rail
        sent += (pm.send_near @ pm.nic_rail_onehot).toarray() * to_nic_u.sum(axis=1, keepdims=True)
    else:
        nic2nic = pm.send_near.T @ to_nic                    # (C, C)
        sent = (pm.send_near @ pm.nic_rail_onehot).toarray() * cross.sum(axis=1, keepdims=True)
    received = (pm.recv_near @ pm.nic_rail_onehot).toarray() * cross.sum(axis=0)[:, None]
    loads += pm.egress.T @ sent.reshape(num_gpus * num_rails)
    loads += pm.ingress.T @ received.reshape(num_gpus * num_rails)
    np.add.at(loads, pm.nic_up, nic2nic.sum(axis=1))
    np.add.at(loads, pm.nic_down, nic2nic.sum(axis=0))
    if pm.num_edge_switches > 1:
        sw2sw = np.asarray(pm.nic_to_switch.T @ (pm.nic_to_switch.T @ nic2nic.T).T)  # (W, W)
        np.fill_diagonal(sw2sw, 0.0)
        loads += pm.fabric_routes.T @ sw2sw.reshape(-1)
    return loads
