"""Built-in node types, usable by name in any topology file and by ``epplan topo gen``.

Numbers are datasheet figures (per direction):
- DGX H100: 8 x H100 SXM5 80 GB (989 dense bf16 TFLOP/s, 3.35 TB/s HBM3), NVLink4 through
  NVSwitch at 450 GB/s per GPU, eight ConnectX-7 400 Gb/s NICs (50 GB/s), one per GPU on its PCIe
  Gen5 x16 switch (64 GB/s). NCCL achieves about 370 GB/s on NVLink and 48-50 GB/s per NIC
  (docs/design.md); files that want effective figures override ``gbps``.
- DGX H200: as DGX H100 with H200 141 GB (4.8 TB/s HBM3e).
- DGX A100: 8 x A100 SXM4 80 GB (312 dense bf16 TFLOP/s, 2,039 GB/s HBM2e), NVLink3 through
  NVSwitch at 300 GB/s per GPU (12 links x 25 GB/s; "600 GB/s" is both directions), eight
  ConnectX-6 200 Gb/s NICs (25 GB/s) on PCIe Gen4 x16 (32 GB/s). NVIDIA DGX A100 datasheet.
- DGX B200: 8 x B200 180 GB (1,440 GB in all; 2,250 dense bf16 TFLOP/s, 8 TB/s HBM3e), NVLink5
  through NVSwitch at 900 GB/s per GPU (the "1.8 TB/s" is both directions), eight ConnectX-7
  400 Gb/s NICs (50 GB/s) on PCIe Gen5 x16 (64 GB/s). NVIDIA DGX B200 datasheet; dense bf16
  of the HGX B200 at 1,000 W.
- GB200 NVL72: one rack, 72 B200 GPUs of 186 GB (13.4 TB in all; 2,500 dense bf16 TFLOP/s at
  1,200 W, 8 TB/s) in one NVLink5 domain at 900 GB/s per GPU through the NVLink switch trays; one
  ConnectX-7 400 Gb/s NIC per GPU (four per compute tray) on PCIe Gen5 x16. NVIDIA GB200 NVL72
  datasheet. A rack is one epplan node: ranks 0..71 share one NVLink domain.
- MI300X (8-GPU OAM platform): 8 x MI300X 192 GB (1,307 dense bf16 TFLOP/s, 5.3 TB/s HBM3), AMD
  Infinity Fabric as a full mesh: 7 xGMI links per GPU, one to each peer, 64 GB/s per direction
  each (896 GB/s bidirectional in all per GPU); eight 400 Gb/s NICs on PCIe Gen5 x16. AMD
  Instinct MI300X datasheet and platform brief.
- pcie-8gpu: 8 x L40S 48 GB (362 dense bf16 TFLOP/s, 864 GB/s), no NVLink; two PCIe Gen4
  switches per socket, two sockets, GPUs on x16 Gen4 (32 GB/s), switch uplinks Gen4 x16,
  sockets joined by 2 x UPI (about 40 GB/s); two 200 Gb/s NICs (25 GB/s), one per socket.
"""

from __future__ import annotations

from epplan.topology.schema import GPUSpec, NICSpec, NodeType, NVSwitchFabric, PCIeFabric, XGMIFabric

A100_SXM = GPUSpec(model="A100-SXM4-80GB", memory_gb=80, bf16_tflops=312, hbm_gbps=2039)
B200 = GPUSpec(model="B200-180GB", memory_gb=180, bf16_tflops=2250, hbm_gbps=8000)
GB200_B200 = GPUSpec(model="B200-186GB (GB200)", memory_gb=186, bf16_tflops=2500, hbm_gbps=8000)
MI300X = GPUSpec(model="MI300X-192GB", memory_gb=192, bf16_tflops=1307, hbm_gbps=5300)
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
    "dgx-a100": NodeType(
        gpus=8, gpu=A100_SXM,
        fabric=NVSwitchFabric(kind="nvswitch", gbps=300, latency_us=1.0),
        nics=NICSpec(gbps=25, attach=list(range(8)), pcie_gbps=32, latency_us=2.0),
        description="NVIDIA DGX A100: 8 x A100 SXM4 80 GB, NVSwitch, 8 x ConnectX-6 200 Gb/s",
    ),
    "dgx-b200": NodeType(
        gpus=8, gpu=B200,
        fabric=NVSwitchFabric(kind="nvswitch", gbps=900, latency_us=1.0),
        nics=NICSpec(gbps=50, attach=list(range(8)), pcie_gbps=64, latency_us=2.0),
        description="NVIDIA DGX B200: 8 x B200, NVLink5 NVSwitch, 8 x ConnectX-7 400 Gb/s",
    ),
    "gb200-nvl72": NodeType(
        gpus=72, gpu=GB200_B200,
        fabric=NVSwitchFabric(kind="nvswitch", gbps=900, latency_us=1.0),
        nics=NICSpec(gbps=50, attach=list(range(72)), pcie_gbps=64, latency_us=2.0),
        description="NVIDIA GB200 NVL72 rack: 72 B200 in one NVLink domain, 72 x ConnectX-7 400 Gb/s",
    ),
    "mi300x": NodeType(
        gpus=8, gpu=MI300X,
        fabric=XGMIFabric(kind="xgmi", gbps=64, latency_us=1.0),
        nics=NICSpec(gbps=50, attach=list(range(8)), pcie_gbps=64, latency_us=2.0),
        description="AMD MI300X platform: 8 x MI300X 192 GB, xGMI full mesh, 8 x 400 Gb/s NICs",
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
