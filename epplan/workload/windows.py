"""Several routing windows: what ``epplan place --routing`` and ``epplan report --routing`` take
when a plan should hold over a stretch of training, not one moment.

Each ``--routing`` value is one window, or expands into several:

- ``SPEC@FIRST:LAST:WIDTH`` (a ``.npz`` trace or a ``drift:`` source): iterations FIRST..LAST cut
  into consecutive windows of WIDTH iteration numbers, ``@FIRST:FIRST+WIDTH-1``,
  ``@FIRST+WIDTH:FIRST+2*WIDTH-1``, ..., the last one ending at LAST (it may be shorter);
- a directory: every routing-statistics ``*.json`` in it, by name (a run's per-window statistics,
  one file per window);
- anything else ``make_traffic`` reads (``epplan.workload.traffic``): one window.

The windows weigh equally. ``mean_traffic`` is their mean, the traffic the manifest records as
the plan's expected routing.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from epplan.errors import param, TrafficError
from epplan.workload.config import ModelConfig
from epplan.workload.traffic import Traffic, make_traffic

MAX_WINDOWS = 1000
_CUT = re.compile(r"^(.*)@(-?\d+):(-?\d+):(-?\d+)$")


def window_specs(values: list[str]) -> list[str]:
    """The window specs that ``values`` (the ``--routing`` values) expand into, in order."""
    out: list[str] = []
    for value in values:
        value = str(value).strip()
        cut = _CUT.match(value)
        if cut:
            base, first, last, width = cut.group(1), *(int(cut.group(i)) for i in (2, 3, 4))
            if width < 1 or last < first:
                raise TrafficError(f"{param('routing', value)}: @FIRST:LAST:WIDTH needs FIRST <= LAST and "
                                   f"WIDTH >= 1, e.g. counts.npz@1:1000:250")
            if (last - first) // width + 1 > MAX_WINDOWS:
                raise TrafficError(f"{param('routing', value)}: cuts into more than {MAX_WINDOWS} windows; "
                                   "use a larger WIDTH")
            out += [f"{base}@{a}:{min(a + width - 1, last)}" for a in range(first, last + 1, width)]
        elif Path(value).is_dir():
            files = sorted(Path(value).glob("*.json"))
            if not files:
                raise TrafficError(f"{param('routing', value)}: a directory without routing statistics "
                                   "(*.json); give files or a directory of them")
            out += [str(f) for f in files]
        else:
            out.append(value)
    if len(out) > MAX_WINDOWS:
        raise TrafficError(f"{param('routing')}: {len(out)} windows, at most {MAX_WINDOWS}")
    return out


def make_windows(values: list[str], config: ModelConfig, num_ranks: int, *,
                 seed: int = 0) -> list[Traffic]:
    """One ``Traffic`` per window of ``values`` (``window_specs``), each shaped as
    ``make_traffic`` shapes it."""
    return [make_traffic(spec, config, num_ranks, seed=seed) for spec in window_specs(values)]


def mean_traffic(windows: list[Traffic]) -> Traffic:
    """The windows' mean (equal weights); its notes are every window's, once each."""
    assert windows
    if len(windows) == 1:
        return windows[0]
    counts = np.mean([w.counts for w in windows], axis=0)
    notes = list(dict.fromkeys(n for w in windows for n in w.notes))
    # Pair counts (co-activation) are linear in the tokens too: their mean, where every window has them.
    pairs = (np.mean([w.pairs for w in windows], axis=0)
             if all(w.pairs is not None for w in windows) else None)
    return Traffic(counts, source=f"mean of {len(windows)} windows ({windows[0].source} .. "
                                  f"{windows[-1].source})", notes=notes, pairs=pairs)
