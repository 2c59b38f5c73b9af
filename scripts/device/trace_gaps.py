"""The GPU's kernels and idle gaps of a ``profile_train.py`` Chrome trace, small enough to bring back.

    python3 scripts/device/trace_gaps.py DIR/trace.json.gz --out DIR

Writes DIR/kernels.csv.gz (one row per GPU kernel or memcpy/memset: start and duration in µs from
the first kernel, stream, name cut to 120 characters) and prints the step's kernel time, its span,
the idle time between kernels, and the 25 longest idle gaps with the kernels on either side and
the CPU operator running when the gap began (the host work the GPU waited for).
"""

import argparse
import bisect
import csv
import gzip
import json
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    with gzip.open(args.trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    cpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function", "user_annotation")),
                 key=lambda e: e["ts"])
    if not gpu:
        raise SystemExit(f"{args.trace}: no GPU kernels in the trace (a CPU run has none)")
    t0 = gpu[0]["ts"]
    with gzip.open(Path(args.out, "kernels.csv.gz"), "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["start_us", "dur_us", "stream", "name"])
        for e in gpu:
            w.writerow([round(e["ts"] - t0, 1), round(e["dur"], 1), e.get("args", {}).get("stream", ""), e["name"][:120]])
    busy_end, gaps = gpu[0]["ts"] + gpu[0]["dur"], []
    prev = gpu[0]
    for e in gpu[1:]:
        if e["ts"] > busy_end:
            gaps.append((e["ts"] - busy_end, busy_end, prev["name"], e["name"]))
        if e["ts"] + e["dur"] > busy_end:
            busy_end, prev = e["ts"] + e["dur"], e
    span = busy_end - t0
    kernel = sum(e["dur"] for e in gpu)
    idle = sum(g[0] for g in gaps)
    print(f"kernels {len(gpu)}, kernel time {kernel / 1e3:.2f} ms, span {span / 1e3:.2f} ms, "
          f"idle {idle / 1e3:.2f} ms in {len(gaps)} gaps, {sum(g[0] for g in gaps if g[0] > 50) / 1e3:.2f} ms in gaps > 50 us")
    starts = [e["ts"] for e in cpu]
    for dur, at, before, after in sorted(gaps, reverse=True)[:25]:
        i = bisect.bisect_right(starts, at) - 1
        ops = [cpu[j]["name"] for j in range(max(0, i - 40), i + 1) if cpu[j]["ts"] + cpu[j]["dur"] >= at]
        print(f"gap {dur:8.1f} us at {(at - t0) / 1e3:8.2f} ms | after {before[:50]} | before {after[:50]} | cpu {' > '.join(o[:40] for o in ops[-4:])}")


if __name__ == "__main__":
    main()
