"""Built-in node types, usable by name in any topology file and by ``epplan topo gen``.

Numbers are datasheet figures (per direction):
- DGX H100: 8 x H100 SXM5 80 GB (989 dense bf16 TFLOP/s, 3.35 TB/s HBM3), NVLink4 through
  NVSwitch at 450 GB/s per GPU, eight ConnectX-7 400 Gb/s NICs (50 GB/s), one per GPU on its PCIe
  Gen5 x16 switch (64 GB/s). NCCL achieves about 370 GB/s on NVLink and 48-50 GB/s per NIC
  (../shared/DESIGN.md); files that want effective figures override ``gbps``.
- DGX H200: as DGX H100 with H200 141 GB (4.8 TB/s HBM3e).
- pcie-8gpu: 8 x L40S 48 GB (362 dense bf16 TFLOP/s, 864 GB/s), no NVLink; two PCIe Gen4
  switches per socket, two sockets, GPUs on x16 Gen4 (32 GB/s), switch uplinks Gen4 x16,
  sockets joined by 2 x UPI (about 40 GB/s); two 200 Gb/s NICs (25 GB/s), one per socket.
"""

from __future__ import annotations

from epplan.topology.schema import GPUSpec, NICSpec, NodeType, NVSwitchFabric, PCIeFabric

H100_SXM = GPUSpec(model="H100-SXM5-80GB", memory_gb=80, bf16_tflops=989, hbm_gbps=3350)
H200_SXM = GPUSpec(model="H200-SXM5-141GB", memory_gb=141, bf16_tflops=989, hbm_gbps=4800)
L40S = GPUSpec(model="L40S-48GB", memory_gb=48, bf16_tflops=362, hbm_gbps=864)

NODE_TYPES: dict[str, NodeType] = {
    "dgx-h100": NodeType(
        gpus=8, gpu=H100_SXM,
        fabric=NVSwitchFabric(kind="nvswitch", gbps=450, latency_us=1.0),
        nics=NICSpec(gbps=50, attach=list(range(8)), pcie_gbps=64, latency_us=2.0),
        description="NVIDIA DGX H100: 8 x H100 SXM5, NVSwitch, 8 x ConnectX-7 400 Gb/s",
    ),
    "dgx-h200": NodeType(
        gpus=8, gpu=H200_SXM,
        fabric=NVSwitchFabric(kind="nvswitch", gbps=450, latency_us=1.0),
        nics=NICSpec(gbps=50, attach=list(range(8)), pcie_gbps=64, latency_us=2.0),
        description="NVIDIA DGX H200: 8 x H200 SXM5, NVSwitch, 8 x ConnectX-7 400 Gb/s",
    ),
    "pcie-8gpu": NodeType(
        gpus=8, gpu=L40S,
        fabric=PCIeFabric(
            kind="pcie", switches=[[0, 1], [2, 3], [4, 5], [6, 7]], gpu_gbps=32, uplink_gbps=32,
            sockets=[[0, 1], [2, 3]], socket_gbps=40, latency_us=2.0),
        nics=NICSpec(gbps=25, attach=[0, 4], pcie_gbps=32, latency_us=2.0),
        description="8 x L40S on PCIe Gen4, two sockets, no NVLink, 2 x 200 Gb/s NICs",
    ),
}
