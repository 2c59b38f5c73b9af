"""Median step time, throughput and loss of `epplan run` metrics files, and how far the losses
of runs under the same exchange (the second dash-separated word of the name) drift apart.

    python3 scripts/device/train_summary.py train-shm-off.jsonl train-shm-on.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

SKIP = 5  # first steps left out of the medians (warm-up, allocator growth)


def steps(path: Path) -> list[dict]:
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r for r in records if r.get("kind") == "step"]


def main(paths: list[str]) -> None:
    runs = {Path(p).name: steps(Path(p)) for p in paths}
    for name, recs in runs.items():
        timed = recs[SKIP:]
        if not timed:
            print(name, f"{len(recs)} steps: too few to time")
            continue
        print(name, f"steps {len(recs)}",
              f"median step {statistics.median(r['step_time_s'] for r in timed):.4f} s",
              f"tokens/s {statistics.median(r['tokens_per_s'] for r in timed):,.0f}",
              f"loss {recs[0]['loss']:.4f} -> {recs[-1]['loss']:.4f}")
    names = sorted(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if a.split("-")[1] == b.split("-")[1]:
                drift = max(abs(x["loss"] - y["loss"]) for x, y in zip(runs[a], runs[b]))
                print(f"max |loss difference| {a} vs {b}: {drift:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
