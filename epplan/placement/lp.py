"""A thin layer over HiGHS (highspy) for the planner's linear programs.

``Highs()`` prints a licence banner on stdout the first time a process creates one, which would
corrupt ``--json`` output; ``new_highs`` creates it with file descriptor 1 pointed at /dev/null.
PuLP's HiGHS interface (used for the MILPs) constructs its own ``Highs`` later and stays quiet
because the banner is printed once per process.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    import highspy

_BANNER_LOCK = threading.Lock()
_BANNER_DONE = False


def new_highs() -> "highspy.Highs":
    """A silent ``highspy.Highs``."""
    global _BANNER_DONE
    import highspy

    with _BANNER_LOCK:
        if not _BANNER_DONE:
            # NOTE: swaps fd 1 for the duration of one constructor call.
            sys.stdout.flush()
            saved = os.dup(1)
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 1)
                h = highspy.Highs()
            finally:
                os.dup2(saved, 1)
                os.close(saved)
                os.close(devnull)
            _BANNER_DONE = True
        else:
            h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    return h


@dataclass
class LPResult:
    x: np.ndarray
    objective: float
    status: str        # "optimal", "time_limit", "infeasible", "error"
    seconds: float


class LP:
    """min c x  s.t.  row_lo <= A x <= row_hi,  col_lo <= x <= col_hi  (A sparse)."""

    def __init__(self, c, a, row_lo, row_hi, col_lo, col_hi, *, threads: int = 1,
                 integrality=None) -> None:
        """``integrality``: bool per column, True for an integer column (a MILP), or None."""
        import highspy

        self.h = h = new_highs()
        h.setOptionValue("threads", threads)
        a = sp.csc_matrix(a)
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = a.shape[1], a.shape[0]
        lp.col_cost_ = np.asarray(c, dtype=np.float64)
        lp.col_lower_ = np.asarray(col_lo, dtype=np.float64)
        lp.col_upper_ = np.asarray(col_hi, dtype=np.float64)
        lp.row_lower_ = np.asarray(row_lo, dtype=np.float64)
        lp.row_upper_ = np.asarray(row_hi, dtype=np.float64)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = a.indptr.astype(np.int32)
        lp.a_matrix_.index_ = a.indices.astype(np.int32)
        lp.a_matrix_.value_ = a.data.astype(np.float64)
        if integrality is not None:
            lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                               for i in integrality]
        h.passModel(lp)

    def solve(self, time_limit: float | None = None) -> LPResult:
        import highspy

        h = self.h
        if time_limit is not None:
            h.setOptionValue("time_limit", max(float(time_limit), 0.01))
        h.run()
        status = h.getModelStatus()
        sol = h.getSolution()
        x = np.asarray(sol.col_value, dtype=np.float64)
        name = {highspy.HighsModelStatus.kOptimal: "optimal",
                highspy.HighsModelStatus.kTimeLimit: "time_limit",
                highspy.HighsModelStatus.kInfeasible: "infeasible"}.get(status, "error")
        return LPResult(x=x, objective=float(h.getInfo().objective_function_value), status=name,
                        seconds=float(h.getRunTime()))

    def add_rows(self, a: sp.spmatrix, lo: ArrayLike, hi: ArrayLike) -> None:
        """Append rows lo <= a x <= hi (a: sparse [rows, columns])."""
        a = sp.csr_matrix(a)
        self.h.addRows(a.shape[0], np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64), a.nnz,
                       a.indptr[:-1].astype(np.int32), a.indices.astype(np.int32), a.data.astype(np.float64))

    def set_cost(self, c: ArrayLike) -> None:
        c = np.asarray(c, dtype=np.float64)
        self.h.changeColsCost(c.size, np.arange(c.size, dtype=np.int32), c)

    def set_col_bounds(self, cols: ArrayLike, lo: ArrayLike, hi: ArrayLike) -> None:
        cols = np.atleast_1d(np.asarray(cols, dtype=np.int32))
        self.h.changeColsBounds(cols.size, cols, np.atleast_1d(np.asarray(lo, dtype=np.float64)),
                                np.atleast_1d(np.asarray(hi, dtype=np.float64)))

    def set_row_bounds(self, rows: ArrayLike, lo: ArrayLike, hi: ArrayLike) -> None:
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int32))
        self.h.changeRowsBounds(rows.size, rows, np.atleast_1d(np.asarray(lo, dtype=np.float64)),
                                np.atleast_1d(np.asarray(hi, dtype=np.float64)))
