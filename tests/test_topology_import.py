"""``epplan topo import`` on files in the formats NCCL, nvidia-smi and Slurm write."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from epplan.cli import app
from epplan.errors import TopologyError
from epplan.topology import load_topology
from epplan.topology.importers import expand_hostlist, import_topology

runner = CliRunner()


def dgx_h100_xml(device: str = "0x2330") -> str:
    """An NCCL_TOPO_DUMP_FILE of an 8 x H100 SXM server (``device`` 0x2335: H200) as NCCL 2.18+ writes it: two sockets,
    each GPU and one 400 Gb/s ConnectX-7 under a shared PCIe Gen5 switch, 18 NVLinks per GPU to
    four NVSwitches (5 + 4 + 5 + 4)."""
    switches = ["0000:05:00.0", "0000:06:00.0", "0000:07:00.0", "0000:08:00.0"]
    out = ['<system version="1">']
    for socket in range(2):
        out.append(f'  <cpu host_hash="0x23d79eeea3fd2808" numaid="{socket}" affinity="ffffffff" arch="x86_64" '
                   'vendor="GenuineIntel" familyid="6" modelid="143">')
        for k in range(4):
            g = socket * 4 + k
            out.append(f'    <pci busid="0000:{0x10 + g * 0x10:02x}:00.0" class="0x060400" vendor="0x1000" '
                       'device="0xc030" link_speed="32.0 GT/s PCIe" link_width="16">')
            out.append(f'      <pci busid="0000:{0x11 + g * 0x10:02x}:00.0" class="0x030200" vendor="0x10de" '
                       f'device="{device}" subsystem_vendor="0x10de" subsystem_device="0x16c1" '
                       'link_speed="32.0 GT/s PCIe" link_width="16">')
            out.append(f'        <gpu dev="{g}" sm="90" rank="{g}" gdr="1">')
            for sw, count in zip(switches, (5, 4, 5, 4)):
                out.append(f'          <nvlink target="{sw}" count="{count}" tclass="0x068000"/>')
            out.append('        </gpu>')
            out.append('      </pci>')
            out.append(f'      <pci busid="0000:{0x12 + g * 0x10:02x}:00.0" class="0x020000" vendor="0x15b3" '
                       'device="0x1021" link_speed="32.0 GT/s PCIe" link_width="16">')
            out.append(f'        <nic><net name="mlx5_{g}" dev="{g}" speed="400000" port="1" latency="0.000000" '
                       f'guid="0xa87cb10003e1a2{g:02x}" maxconn="131072" gdr="1"/></nic>')
            out.append('      </pci>')
            out.append('    </pci>')
        out.append('  </cpu>')
    out.append('</system>')
    return "\n".join(out) + "\n"


def dgx_h100_smi() -> str:
    """'nvidia-smi topo -m' of the same server (tab separated, as the tool prints it)."""
    n = 8
    head = "\t" + "\t".join([f"GPU{i}" for i in range(n)] + [f"NIC{i}" for i in range(n)]) + \
        "\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID"
    rows = [head]

    def rel(a, b):  # PCIe relation of device a to device b on this board
        if a == b:
            return "PIX"
        return "NODE" if a // 4 == b // 4 else "SYS"

    for i in range(n):
        cells = [" X " if j == i else "NV18" for j in range(n)] + [rel(i, j) for j in range(n)]
        rows.append(f"GPU{i}\t" + "\t".join(cells) + f"\t{0 if i < 4 else 56}-{55 if i < 4 else 111}\t{i // 4}\t\tN/A")
    for i in range(n):
        cells = [rel(i, j) for j in range(n)] + [" X " if j == i else rel(i, j) for j in range(n)]
        rows.append(f"NIC{i}\t" + "\t".join(cells))
    legend = ["", "Legend:", "", "  X    = Self",
              "  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)",
              "  NV#  = Connection traversing a bonded set of # NVLinks", "", "NIC Legend:", ""]
    legend += [f"  NIC{i}: mlx5_{i}" for i in range(n)]
    return "\n".join(rows + legend) + "\n"


PCIE_SMI = """\
\tGPU0\tGPU1\tGPU2\tGPU3\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tNV12\tSYS\tSYS\tPIX\t0-31\t0\t\tN/A
GPU1\tNV12\t X \tSYS\tSYS\tPIX\t0-31\t0\t\tN/A
GPU2\tSYS\tSYS\t X \tNV12\tSYS\t32-63\t1\t\tN/A
GPU3\tSYS\tSYS\tNV12\t X \tSYS\t32-63\t1\t\tN/A
NIC0\tPIX\tPIX\tSYS\tSYS\t X

Legend:

  X    = Self
  NV#  = Connection traversing a bonded set of # NVLinks

NIC Legend:

  NIC0: mlx5_0
"""

SLURM = """\
# topology.conf: two leaves of two DGX each under one spine
SwitchName=leaf0 Nodes=dgx[01-02]
SwitchName=leaf1 Nodes=dgx[03-04] LinkSpeed=400
SwitchName=spine Switches=leaf[0-1]
"""


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _node(topo_text, tmp_path):
    path = _write(tmp_path, "out.yaml", topo_text)
    return load_topology(path)


def test_nccl_xml_dgx_h100_matches_the_datasheet_node(tmp_path):
    result = import_topology([_write(tmp_path, "topo.xml", dgx_h100_xml())], nodes=2)
    topo = _node(result.text, tmp_path)
    ntype = topo.node_type(0)
    assert topo.num_gpus == 16 and ntype.gpu.model == "H100-SXM5-80GB"
    assert ntype.fabric.kind == "nvswitch" and ntype.fabric.gbps == 450.0  # 18 links x 25 GB/s
    assert ntype.nics.gbps == 50.0 and ntype.nics.attach == list(range(8))  # 400000 Mb/s, GPU-local
    assert ntype.nics.pcie_gbps == pytest.approx(63.0, abs=0.1)  # Gen5 x16, 128b/130b
    assert any("NVSwitch: 18 NVLinks" in n for n in result.assumptions)
    assert result.text.startswith("# Written by `epplan topo import`.\n# assumed:")


def test_the_pci_device_names_the_gpu(tmp_path):
    result = import_topology([_write(tmp_path, "topo.xml", dgx_h100_xml("0x2335"))])
    assert _node(result.text, tmp_path).node_type(0).gpu.model == "H200-SXM5-141GB"


def test_nvidia_smi_matches_the_xml_import(tmp_path):
    from_xml = import_topology([_write(tmp_path, "topo.xml", dgx_h100_xml())])
    from_smi = import_topology([_write(tmp_path, "topo.txt", dgx_h100_smi())])
    a, b = _node(from_xml.text, tmp_path).node_type(0), _node(from_smi.text, tmp_path).node_type(0)
    assert (a.gpus, a.fabric.gbps, a.nics.attach, a.nics.gbps) == (b.gpus, b.fabric.gbps, b.nics.attach, b.nics.gbps)
    notes = " ".join(from_smi.assumptions)
    assert "GPU model h100" in notes and "NIC speed 400Gb/s" in notes  # said, not silent


def test_nvidia_smi_pcie_box_with_bridges(tmp_path):
    result = import_topology([_write(tmp_path, "pcie.txt", PCIE_SMI)], gpu="a100", nic_gbps="200Gb/s")
    ntype = _node(result.text, tmp_path).node_type(0)
    assert ntype.fabric.kind == "pcie"
    assert ntype.fabric.switches == [[0, 1], [2], [3]] or ntype.fabric.switches == [[0, 1], [2, 3]]
    assert ntype.fabric.nvlink_bridges == [(0, 1), (2, 3)] and ntype.fabric.bridge_gbps == 300.0
    assert ntype.fabric.sockets is not None and len(ntype.fabric.sockets) == 2
    assert ntype.nics.gbps == 25.0 and ntype.nics.attach == [0]


def test_slurm_with_a_server_file_and_with_a_builtin_type(tmp_path):
    conf = _write(tmp_path, "topology.conf", SLURM)
    result = import_topology([_write(tmp_path, "topo.xml", dgx_h100_xml()), conf], name="four")
    topo = _node(result.text, tmp_path)
    assert topo.name == "four" and topo.node_names == ["dgx01", "dgx02", "dgx03", "dgx04"]
    assert topo.num_gpus == 32
    links = {topo.link_name(i): c for i, c in enumerate(topo.link_capacity)}
    assert links["dgx01/nic0 -> leaf0"] == 50.0
    assert links["leaf0 -> spine"] == 2 * 8 * 50.0  # non-blocking: all it has below
    assert any("LinkSpeed" in n for n in result.assumptions)
    # Traffic between leaves crosses the spine.
    path = {topo.link_name(i) for i in topo.paths.pair_fractions(0, 16)}
    assert "leaf0 -> spine" in path and "spine -> leaf1" in path
    builtin = import_topology([conf], node_type="dgx-b200")
    assert _node(builtin.text, tmp_path).node_type(0).fabric.gbps == 900.0


def test_hostlists():
    assert expand_hostlist("dgx[01-03,7],login", "x") == ["dgx01", "dgx02", "dgx03", "dgx7", "login"]
    assert expand_hostlist("n[8-10]-ib", "x") == ["n8-ib", "n9-ib", "n10-ib"]


@pytest.mark.parametrize("files, kwargs, match", [
    ({"a.txt": "hello"}, {}, "not a topology description"),
    ({"a.xml": "<system><gpu dev='0'/></system>"}, {}, "is not inside a <pci busid"),
    ({"c.conf": "SwitchName=s1 Switches=s9\n"}, {"node_type": "dgx-h100"}, "switch 's9' is not defined"),
    ({"c.conf": "SwitchName=s1 Nodes=a\nSwitchName=s2 Nodes=a\n"}, {"node_type": "dgx-h100"}, "under switches"),
    ({"c.conf": SLURM}, {}, "node_type"),
    ({"x.xml": "<system version='1'><gpu"}, {}, "not well-formed XML"),
])
def test_bad_inputs_are_clear_errors(tmp_path, files, kwargs, match):
    paths = [_write(tmp_path, n, t) for n, t in files.items()]
    with pytest.raises(TopologyError, match=match):
        import_topology(paths, **kwargs)


def test_cli_writes_a_file_that_places(tmp_path):
    xml = _write(tmp_path, "topo.xml", dgx_h100_xml())
    conf = _write(tmp_path, "topology.conf", SLURM)
    out = tmp_path / "cluster.yaml"
    result = runner.invoke(app, ["topo", "import", str(xml), str(conf), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "assumed:" in result.output
    result = runner.invoke(app, ["topo", "validate", str(out)])
    assert result.exit_code == 0 and "32 GPUs" in result.stdout and "warning" not in result.stdout
    plan = tmp_path / "plan.json"
    result = runner.invoke(app, ["place", "--topology", str(out), "--set", "num_layers=1", "--set",
                                 "num_experts=32", "--placement", "eplb", "--out", str(plan)])
    assert result.exit_code == 0, result.output
