"""Write the shipped cost tables from a calibration file: h200.json (the H200's own, rounded to 3
significant digits; expert points at fewer rows per expert than it measured are kept from the
h200.json it replaces) and h100.json (derived from it by the stated factors).

    python scripts/derive_tables.py scripts/device/cal-h200-dev15g.json "call G (scripts/device/dev15g.sh)"

H100 factors (docs/benchmarks.md): FLOP-bound rates (gemm, expert, attention, the chunked LM
head) and the attention halves x 0.99 (the seed block took 340.2 ms on one H100 and 337 ms on
one H200); memory-bound rates and moe_local x 0.698 (HBM 3.35 vs 4.8 TB/s, datasheets); the
step's fixed cost (host-bound: launches and round trips) as measured on the H200; attention at
10,000 tokens is the H100's own cuDNN measurement, 430 TF/s (45.7 ms).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

TABLES = Path(__file__).resolve().parents[1] / "epplan" / "cost" / "tables"
FLOP, MEMORY = 0.99, 0.698
H100_ATTENTION_10K = 430.0


def sig3(x: float) -> float:
    return float(f"{x:.3g}") if x else 0.0


def rounded(obj):
    if isinstance(obj, float):
        return sig3(obj)
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    return obj


def scaled(rows: list[dict], key: str, factor: float) -> list[dict]:
    return [{**r, key: round(r[key] * factor, 1)} for r in rows]


def main(cal_path: str, call: str) -> None:
    cal = json.loads(Path(cal_path).read_text())
    date = cal["provenance"].split(", ")[1] if ", " in cal["provenance"] else ""
    h200 = rounded({k: v for k, v in cal.items() if k not in ("provenance", "collectives")})
    h200["collectives"] = {}
    # Rows per expert below the calibration's smallest: kept from the table shipped before (the
    # planner's small-row regime; a rate held from 512 rows would overstate 128 rows by ~1.8x).
    old = json.loads((TABLES / "h200.json").read_text())
    kept = 0
    for row in h200["expert"]:
        low = min(m for m, _ in row["points"])
        same = [r for r in old["expert"] if all(r.get(k) == row.get(k) for k in
                                                ("d_model", "d_ff", "activation", "path"))]
        extra = [p for r in same[:1] for p in r["points"] if p[0] < low]
        row["points"] = extra + row["points"]
        kept += len(extra)
    h200["provenance"] = (f"Measured on one NVIDIA H200 (700 W, nvidia-h200 lent machine), {date}, torch "
                          f"{cal['software']['torch']}, by 'epplan calibrate --iters 3 --rows "
                          "512,1024,2048,4096,8192,16384 --model seed --model scripts/device/seed4.yaml --model "
                          f"mixtral-8x7b --model scripts/device/medium.yaml', {call}: every table (the bf16 "
                          "residual stream, the one-pass AdamW, the chunked LM head per model, the step's "
                          "fixed cost per parameter-tensor count; docs/benchmarks.md); 3 significant digits; "
                          f"{kept} expert points below the calibration's smallest rows per expert kept "
                          "from the table before (call A, scripts/device/dev15a.sh); "
                          f"written by scripts/derive_tables.py from {cal_path}.")
    h100 = json.loads(json.dumps(h200))
    h100["gpu"] = "NVIDIA H100 80GB HBM3"
    h100["software"] = {k: v for k, v in h200["software"].items() if k != "cudnn"}
    h100["gemm"] = scaled(h200["gemm"], "tflops", FLOP)
    h100["expert"] = [{**r, "points": [[m, round(t * FLOP, 1)] for m, t in r["points"]]} for r in h200["expert"]]
    h100["attention"] = [{**r, "tflops": H100_ATTENTION_10K if r["seq_len"] == 10000 else round(r["tflops"] * FLOP, 1)}
                         for r in h200["attention"]]
    h100["attention_block"] = scaled(h200["attention_block"], "tflops", FLOP)
    h100["lm_head"] = scaled(h200["lm_head"], "tflops", FLOP)
    h100["memory"] = {k: round(v * MEMORY, 1) for k, v in h200["memory"].items()}
    h100["moe_local"] = scaled(h200["moe_local"], "gbps", MEMORY)
    h100["provenance"] = (f"Derived, not measured as a whole: the H200 table (epplan calibrate, {date}, {call}) "
                          f"with FLOP-bound rates (gemm, expert, attention, lm_head) and attention halves x "
                          f"{FLOP} (the seed block took 340.2 ms on one H100 and 337 ms on one H200, "
                          f"docs/benchmarks.md), memory-bound rates (and moe_local) x {MEMORY} (HBM 3.35 vs "
                          "4.8 TB/s, datasheets), the step's fixed cost (host-bound) as on the H200; attention "
                          f"at 10,000 tokens is the H100's own cuDNN measurement, {H100_ATTENTION_10K:.0f} TF/s "
                          "(45.7 ms, docs/benchmarks.md). Written by scripts/derive_tables.py. Run 'epplan "
                          "calibrate' on an H100 for a measured table.")
    order = ["format", "version", "gpu", "provenance", "software", "gemm", "expert", "attention", "memory",
             "collectives", "attention_block", "moe_local", "lm_head", "optimizer_fixed"]
    for name, table in (("h200", h200), ("h100", h100)):
        assert not any(isinstance(v, float) and not math.isfinite(v) for v in table["memory"].values())
        (TABLES / f"{name}.json").write_text(json.dumps({k: table[k] for k in order}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
