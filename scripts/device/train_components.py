"""Median per-component seconds of `epplan run` metrics files (``timing`` records), after warm-up.

    python3 scripts/device/train_components.py run-a/metrics.jsonl run-b/metrics.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

SKIP = 2  # first steps left out (warm-up, allocator growth)


def main(paths: list[str]) -> None:
    for p in paths:
        records = [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()]
        timing = [r["components_s"] for r in records if r.get("kind") == "timing" and r["step"] > SKIP]
        steps = [r for r in records if r.get("kind") == "step" and r["step"] > SKIP]
        if not timing or not steps:
            print(p, "too few steps")
            continue
        names = sorted({k for t in timing for k in t})
        med = {k: statistics.median(t[k] for t in timing if k in t) for k in names}
        mfu = statistics.median(r["mfu"] or 0 for r in steps)
        print(p, f"step_time_s {statistics.median(r['step_time_s'] for r in steps):.4f}", f"mfu {mfu:.4f}",
              " ".join(f"{k} {v:.4f}" for k, v in med.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
