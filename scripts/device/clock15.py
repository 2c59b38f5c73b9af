"""The card's clock in each part of a call with ``lib15.sh``'s ``clock_log`` (call AM on).

    python3 scripts/device/clock15.py OUT_DIR

Reads OUT_DIR/smi.csv (``nvidia-smi ... -lms 100``) and OUT_DIR/all.log, and prints for every
window between two ``stamp`` lines, and for every ``probe_head15.py`` measurement (its UTC start
and end), the median SM clock and power of the samples above 250 W (the card at work: a window
also holds process start-up at idle clocks), with their count.
"""

import re
import statistics
import sys
from datetime import datetime

BUSY_W = 250.0


def seconds(hms: str) -> float:
    h, m, s = hms.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def main(out: str) -> None:
    samples = []  # (seconds of the day, MHz, W)
    for line in open(f"{out}/smi.csv"):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[1].split()[0].isdigit():
            continue  # the header, or a line nvidia-smi could not fill
        t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
        samples.append((t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6,
                        float(parts[1].split()[0]), float(parts[2].split()[0])))

    def show(label: str, start: float, end: float) -> None:
        busy = [s for s in samples if start <= s[0] <= end and s[2] > BUSY_W]
        clock = f"{statistics.median(s[1] for s in busy):5.0f} MHz" if busy else "    - MHz"
        power = f"{statistics.median(s[2] for s in busy):4.0f} W" if busy else "   - W"
        print(f"{label:44s} {end - start:6.1f} s  {clock}  {power}  ({len(busy)} busy samples)")

    log = open(f"{out}/all.log").read().splitlines()
    stamps = [(m.group(2), seconds(m.group(1))) for line in log
              if (m := re.search(r"\((\d\d:\d\d:\d\d)\): (\S+)", line))]
    for (label, start), (_, end) in zip(stamps, stamps[1:]):
        show(label, start, end)
    for line in log:
        if m := re.match(r"head (\S+) rep (\d) (\S+)\s+(\S+)-(\S+)\s+([\d.]+)", line):
            show(f"head {m.group(1)} {m.group(2)} {m.group(3)} ({m.group(6)} TFLOP/s)",
                 seconds(m.group(4)), seconds(m.group(5)))


if __name__ == "__main__":
    main(sys.argv[1])
