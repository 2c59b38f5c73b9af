"""How traffic between GPU pairs spreads over the links: the path model.

A pair's traffic follows one of two shapes:

- same node: ECMP shortest paths inside the server (NVSwitch, PCIe tree, NVLink bridges); no GPU
  forwards traffic for another.
- different nodes: three segments. (1) Inside the source server from the GPU to a sending NIC;
  (2) across the fabric from that NIC's switch to the receiving NIC's switch; (3) inside the
  destination server from the receiving NIC to the GPU. The receiving NICs of a GPU are its
  nearest ones (its own, where it has one). The sending NIC is the sender's nearest under
  ``ecmp`` routing; under ``rail_aligned`` routing (NCCL's PXN) it is the NIC of the source server
  on the receiving NIC's rail, reached over the intra-node fabric.

Equal-cost paths share traffic evenly hop by hop, as switches' ECMP hashing does. A GPU forwards
traffic only between the intra-node fabric and its own NIC (the PXN proxy path).

The model never materialises a pairs x links matrix. It keeps sparse per-segment tables: per
same-node pair, per (GPU, rail) egress and ingress segment, per (edge switch, edge switch) fabric
route, and which NIC sends a cross-node pair's traffic (``send_near``, ``is_own_rail``: the one
place the routing's rail-aligned case is decided). ``epplan.cost.linkmap`` applies the tables,
to [G, G] traffic matrices and to single pairs; ``Topology.link_loads`` is that map.

Shape legend: G = GPUs, L = links, N = nodes, C = NICs, R = rails (max NICs per node),
W = edge switches (those NICs plug into).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import scipy.sparse as sp

from epplan.errors import TopologyError


def ecmp_fractions(adj: dict[str, list[str]], src: str, dst: str,
                   dist: dict[str, int] | None = None) -> dict[tuple[str, str], float]:
    """Per-hop ECMP split of one unit from ``src`` to ``dst`` over the digraph ``adj``.

    Returns {(u, v): fraction}; empty if ``dst`` is unreachable (and src != dst).
    dist: ``hops_to(adj, dst)`` where the caller routes many sources to one ``dst``.
    """
    if dist is None:
        dist = hops_to(adj, dst)
    if src not in dist:
        return {}
    flow = {src: 1.0}
    out: dict[tuple[str, str], float] = {}
    frontier = [src]
    for _ in range(dist[src]):
        nxt: dict[str, float] = {}
        for u in frontier:
            hops = [v for v in adj.get(u, ()) if dist.get(v, -1) == dist[u] - 1]
            share = flow[u] / len(hops)
            for v in hops:
                out[u, v] = out.get((u, v), 0.0) + share
                nxt[v] = nxt.get(v, 0.0) + share
        flow.update(nxt)
        frontier = list(nxt)
    return out


def hops_to(adj: dict[str, list[str]], dst: str) -> dict[str, int]:
    """{u: hops of the shortest path u -> ``dst``} over the digraph ``adj`` (breadth-first from
    ``dst`` over the reversed edges), for the vertices that reach ``dst``."""
    radj: dict[str, list[str]] = {}
    for u, vs in adj.items():
        for v in vs:
            radj.setdefault(v, []).append(u)
    dist = {dst: 0}
    queue = deque([dst])
    while queue:
        v = queue.popleft()
        for u in radj.get(v, ()):
            if u not in dist:
                dist[u] = dist[v] + 1
                queue.append(u)
    return dist


def _adjacency(graph, allowed: set[str]) -> dict[str, list[str]]:
    return {u: [v for v in graph.successors(u) if v in allowed] for u in allowed}


class PathModel:
    """Sparse path tables of a ``Topology`` and the linear map traffic -> link loads."""

    def __init__(self, topo) -> None:
        self.topo = topo
        graph = topo.graph
        num_gpus, num_links = topo.num_gpus, topo.num_links
        self.num_gpus = num_gpus
        self.routing = topo.routing
        kinds = dict(graph.nodes(data="kind"))
        self._kinds = kinds

        # NIC tables.
        nic_names = [d for d, k in kinds.items() if k == "nic"]
        self.num_nics = len(nic_names)
        nic_id = {d: c for c, d in enumerate(nic_names)}
        self.nic_node = np.array([graph.nodes[d]["node"] for d in nic_names], dtype=np.int64)
        self.nic_rail = np.array([graph.nodes[d]["rail"] for d in nic_names], dtype=np.int64)
        self.num_rails = int(self.nic_rail.max()) + 1 if nic_names else 1
        self.node_rail_nic = np.full((topo.num_nodes, self.num_rails), -1, dtype=np.int64)
        self.node_rail_nic[self.nic_node, self.nic_rail] = np.arange(self.num_nics)

        # Segments inside each server, computed once per distinct server shape.
        node_devices: list[list[str]] = [[] for _ in range(topo.num_nodes)]
        for d, n in graph.nodes(data="node"):
            if n is not None:
                node_devices[n].append(d)
        gpus_of_node: list[np.ndarray] = [np.flatnonzero(topo.gpu_node == n) for n in range(topo.num_nodes)]
        templates: dict[tuple, dict] = {}
        intra_rows, intra_cols, intra_vals, intra_src, intra_dst = [], [], [], [], []
        eg_rows, eg_cols, eg_vals, ig_rows, ig_cols, ig_vals = [], [], [], [], [], []
        send_rows, send_cols, send_vals, recv_rows, recv_cols, recv_vals = [], [], [], [], [], []
        num_rails = self.num_rails
        for n, name in enumerate(topo.node_names):
            key = (topo.node_types[n], tuple(sorted(r for r in range(num_rails) if self.node_rail_nic[n, r] < 0)))
            if key not in templates:
                templates[key] = self._server_template(graph, name, node_devices[n], kinds)
            tpl = templates[key]
            prefix = name + "/"
            idx_of = {(u, v): graph.edges[prefix + u, prefix + v]["idx"] for (u, v) in tpl["edges"]}
            ranks = gpus_of_node[n]
            for (i, j), fr in tpl["intra"].items():
                row = len(intra_src)
                intra_src.append(ranks[i])
                intra_dst.append(ranks[j])
                for e, f in fr.items():
                    intra_rows.append(row); intra_cols.append(idx_of[e]); intra_vals.append(f)
            for (i, r), fr in tpl["egress"].items():
                for e, f in fr.items():
                    eg_rows.append(ranks[i] * num_rails + r); eg_cols.append(idx_of[e]); eg_vals.append(f)
            for (r, j), fr in tpl["ingress"].items():
                for e, f in fr.items():
                    ig_rows.append(ranks[j] * num_rails + r); ig_cols.append(idx_of[e]); ig_vals.append(f)
            for i, rails in enumerate(tpl["near"]):
                for r in rails:
                    c = self.node_rail_nic[n, r]
                    send_rows.append(ranks[i]); send_cols.append(c); send_vals.append(1.0 / len(rails))
                    recv_rows.append(ranks[i]); recv_cols.append(c); recv_vals.append(1.0 / len(rails))
            if topo.num_nodes > 1 and any(len(r) == 0 for r in tpl["near"]):
                i = next(i for i, r in enumerate(tpl["near"]) if not r)
                raise TopologyError(
                    f"GPU {name}/gpu{i} can reach no NIC of its node, so it has no path to other nodes")

        self.intra_src = np.array(intra_src, dtype=np.int64)
        self.intra_dst = np.array(intra_dst, dtype=np.int64)
        self.intra = sp.csr_matrix((intra_vals, (intra_rows, intra_cols)), shape=(len(intra_src), num_links))
        self.egress = sp.csr_matrix((eg_vals, (eg_rows, eg_cols)), shape=(num_gpus * num_rails, num_links))
        self.ingress = sp.csr_matrix((ig_vals, (ig_rows, ig_cols)), shape=(num_gpus * num_rails, num_links))
        self.send_near = sp.csr_matrix((send_vals, (send_rows, send_cols)), shape=(num_gpus, self.num_nics))
        self.recv_near = sp.csr_matrix((recv_vals, (recv_rows, recv_cols)), shape=(num_gpus, self.num_nics))
        # NIC -> rail one-hot, to fold per-NIC amounts into per-(GPU, rail) rows of egress/ingress.
        self.nic_rail_onehot = sp.csr_matrix(
            (np.ones(self.num_nics), (np.arange(self.num_nics), self.nic_rail)), shape=(self.num_nics, num_rails))
        # The sending NIC of a cross-node pair whose receiving NIC is on rail r: under
        # ``rail_aligned`` routing (NCCL's PXN) the source node's NIC on rail r where it has one,
        # reached over the intra-node fabric; otherwise (and always under ``ecmp``) the source's
        # nearest NICs, ``send_near``.
        self.is_own_rail = np.zeros((num_gpus, num_rails), dtype=bool)   # bool[G, R]
        if self.routing == "rail_aligned":
            self.is_own_rail = self.node_rail_nic[topo.gpu_node] >= 0
        self._fabric(graph, nic_names, nic_id, kinds)

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _server_template(graph, name: str, devices: list[str], kinds: dict[str, str]) -> dict:
        """Segments of one server in local names ('gpu0', 'nvswitch', 'nic3', ...)."""
        prefix = name + "/"
        local = {d: d[len(prefix):] for d in devices}
        gpus = sorted((d for d in devices if kinds[d] == "gpu"), key=lambda d: graph.nodes[d]["local"])
        nics = {graph.nodes[d]["rail"]: d for d in devices if kinds[d] == "nic"}
        fabric_devs = {d for d in devices if kinds[d] not in ("gpu", "nic")}
        edges: set[tuple[str, str]] = set()

        def segment(src: str, dst: str, extra: set[str]) -> dict[tuple[str, str], float]:
            adj = _adjacency(graph, fabric_devs | {src, dst} | extra)
            fr = ecmp_fractions(adj, src, dst)
            out = {(local[u], local[v]): f for (u, v), f in fr.items()}
            edges.update(out)
            return out

        intra = {}
        for i, gi in enumerate(gpus):
            for j, gj in enumerate(gpus):
                if i != j:
                    fr = segment(gi, gj, set())
                    if not fr:
                        raise TopologyError(f"GPU {gi} has no path to GPU {gj} inside node {name}")
                    intra[i, j] = fr
        egress, ingress, near = {}, {}, []
        for i, gi in enumerate(gpus):
            best, rails = None, []
            for r, nic in sorted(nics.items()):
                proxy = {prefix + f"gpu{graph.nodes[nic]['gpu']}"}
                out = segment(gi, nic, proxy)
                back = segment(nic, gi, proxy)
                if not out or not back:
                    continue
                egress[i, r], ingress[r, i] = out, back
                hops = sum(out.values())  # one unit per hop: the segment's length
                if best is None or hops < best - 1e-9:
                    best, rails = hops, [r]
                elif abs(hops - best) <= 1e-9:
                    rails.append(r)
            near.append(rails)
        return {"intra": intra, "egress": egress, "ingress": ingress, "near": near, "edges": edges}

    def _fabric(self, graph, nic_names: list[str], nic_id: dict[str, int], kinds: dict[str, str]) -> None:
        """Uplink/downlink of each NIC and ECMP routes between the switches NICs plug into."""
        num_links = self.topo.num_links
        self.nic_up = np.full(self.num_nics, -1, dtype=np.int64)
        self.nic_down = np.full(self.num_nics, -1, dtype=np.int64)
        nic_switch = np.full(self.num_nics, -1, dtype=np.int64)
        switches = [d for d, k in kinds.items() if graph.nodes[d].get("node") is None]
        edge_switches: list[str] = []
        edge_id: dict[str, int] = {}
        for nic in nic_names:
            ups = [v for v in graph.successors(nic) if kinds[v] != "gpu" and graph.nodes[v].get("node") is None]
            if not ups:
                continue
            assert len(ups) == 1, f"{nic} has {len(ups)} uplinks"
            sw = ups[0]
            c = nic_id[nic]
            self.nic_up[c] = graph.edges[nic, sw]["idx"]
            self.nic_down[c] = graph.edges[sw, nic]["idx"]
            if sw not in edge_id:
                edge_id[sw] = len(edge_switches)
                edge_switches.append(sw)
            nic_switch[c] = edge_id[sw]
        if self.topo.num_nodes > 1:
            missing = np.flatnonzero(self.nic_up < 0)
            if missing.size:
                raise TopologyError(f"NIC {nic_names[missing[0]]} is connected to no switch")
        self.nic_switch = nic_switch
        self.num_edge_switches = len(edge_switches)
        adj = _adjacency(graph, set(switches))
        rows, cols, vals = [], [], []
        num_w = len(edge_switches)
        idx = {(u, v): i for u, v, i in graph.edges(data="idx") if u in adj and v in adj}
        # One breadth-first search per destination switch, not per pair (W^2 searches took 2-6 s
        # at 64 nodes x 3 tiers).
        for b, sb in enumerate(edge_switches):
            dist = hops_to(adj, sb)
            for a, sa in enumerate(edge_switches):
                if a == b:
                    continue
                fr = ecmp_fractions(adj, sa, sb, dist)
                if not fr:
                    raise TopologyError(
                        f"fabric: switch {sa} has no path to switch {sb}, so GPUs behind them cannot talk")
                for (u, v), f in fr.items():
                    rows.append(a * num_w + b); cols.append(idx[u, v]); vals.append(f)
        self.fabric_routes = sp.csr_matrix((vals, (rows, cols)), shape=(num_w * num_w, num_links))
        valid = nic_switch >= 0
        self.nic_to_switch = sp.csr_matrix(
            (np.ones(int(valid.sum())), (np.flatnonzero(valid), nic_switch[valid])),
            shape=(self.num_nics, max(num_w, 1)))

    # ------------------------------------------------------------------ per pair

    def pair_fractions(self, src: int, dst: int) -> dict[int, float]:
        """{link index: fraction} of one unit sent from rank ``src`` to rank ``dst``."""
        from epplan.cost.linkmap import link_map

        return link_map(self.topo).pair_fractions(src, dst)
