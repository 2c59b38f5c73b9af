"""The planner beside rank 0 of a re-planning run (``epplan.train.replan``): a process of its
own, ``python -m epplan.train.side_planner``, that answers ``Request``s with ``Proposal``s.

Shape legend: L = MoE layers, G = ranks, E = experts per layer.

Why a plain subprocess rather than multiprocessing's spawn or forkserver: both import the
parent's main module in the child (the torchrun worker, hence torch: seconds, and the memory of
a second torch), and fork is unsafe in a process that holds communicator threads. This module
imports only the planner (no torch). Requests and answers are pickled over the child's stdin
and a copy of its stdout; anything the solvers print goes to stderr.

The child ends when its stdin closes (the trainer ended or died), after the solve in progress;
SIGTERM (``SidePlanner.close``) ends that solve at once, through its ``finally`` blocks, so
that the solver's own worker processes stop too.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from epplan.errors import EpplanError
from epplan.placement.types import Placement
from epplan.workload.config import ModelConfig


@dataclass(frozen=True)
class Request:
    """What the side process plans from."""

    topology: str                 # the cluster's topology file (the manifest's)
    routing: str                  # the manifest's topology routing (ecmp | rail_aligned)
    config: ModelConfig           # the run's model (the manifest's, at the run's global batch)
    options: dict[str, Any]       # PlacementProblem keywords: the manifest's (Manifest.problem_options)
    counts: np.ndarray            # float64 [L, G, E] token-assignments of the window, per step
    window: tuple[int, int]       # its first and last step
    current: Placement            # the placement in force
    time_limit: float             # seconds for the solve
    routing_file: str             # where the run writes the window's routing statistics if it moves
                                  # (the new manifest's routing spec: report and place read it)


@dataclass(frozen=True)
class Proposal:
    """The side process's answer. ``error``: why there is no plan (then the rest is empty)."""

    window: tuple[int, int]
    doc: dict[str, Any] | None = None    # the new manifest document
    moves: tuple = ()                    # plan_migration's moves
    bytes_moved: float = 0.0
    predicted_move_s: float = 0.0
    current_s: float = 0.0               # predicted MoE time per step of the placement in force ...
    proposed_s: float = 0.0              # ... and of the new placement, on the window's routing
    solve_s: float = 0.0
    error: str | None = None


_TOPOLOGIES: dict[tuple[str, str], Any] = {}  # the side process loads the cluster once


def propose(request: Request) -> Proposal:
    """Plan from a window (pure but for reading the topology file): the new placement, both
    placements' predicted MoE time per step on the window's routing, and the move."""
    from epplan.cost import evaluate
    from epplan.cost.migration import plan_migration
    from epplan.manifest import build_manifest
    from epplan.placement.problem import PlacementProblem
    from epplan.placement.solve import solve
    from epplan.topology import load_topology
    from epplan.workload.traffic import Traffic, fit_counts

    first, last = request.window
    try:
        key = (request.topology, request.routing)
        if key not in _TOPOLOGIES:
            _TOPOLOGIES[key] = load_topology(request.topology, routing=request.routing)
        name = f"{request.routing_file} (steps {first}-{last})"
        counts, notes = fit_counts(request.counts, request.config, request.current.num_ranks, name=name)
        problem = PlacementProblem(_TOPOLOGIES[key], request.config, Traffic(counts, name, notes),
                                   **request.options)
        start = time.perf_counter()
        new = solve(problem, time_limit=request.time_limit, workers=1)
        solve_s = time.perf_counter() - start
        migration = plan_migration(request.current, new, problem)
        cost = evaluate(new, problem)
        doc = build_manifest(new, problem, cost=cost, routing_spec=request.routing_file)
        return Proposal(request.window, doc, migration.moves, migration.bytes_moved, migration.seconds,
                        evaluate(request.current, problem).objective_s, cost.objective_s, solve_s)
    except EpplanError as exc:
        return Proposal(request.window, error=str(exc))
    except Exception as exc:  # a defect of the planner must not stop training: say it, skip this re-plan
        import traceback

        traceback.print_exc()
        return Proposal(request.window, error=f"the planner failed: {type(exc).__name__}: {exc} "
                                              "(traceback in the run's output)")


class SidePlanner:
    """The side process, seen from rank 0: ``submit`` a request, later take its ``result``."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the solvers run single-threaded beside training
        self._process = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, env=env)

    def submit(self, request: Request) -> None:
        try:
            pickle.dump(request, self._process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._process.stdin.flush()
        except OSError:  # the process ended: result() says so
            pass

    def result(self, window: tuple[int, int]) -> Proposal:
        """The answer to the request submitted last, of ``window`` (waits for it); if the process
        ended, a ``Proposal`` whose error says so."""
        try:
            return pickle.load(self._process.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            return Proposal(window, error=f"the re-planning process ended (exit code {self._process.poll()}; "
                                          "its output is above); no more re-plans in this run")

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for pipe in (self._process.stdin, self._process.stdout):
            try:
                pipe.close()
            except OSError:  # the child is gone; what it did not read is not needed
                pass


def main() -> None:
    """The child: answer requests from stdin until it closes."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # solver output goes to stderr, never into the answers
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer
    from epplan.train import side_planner  # by name, not as __main__: the parent unpickles its classes
    import epplan.cost.migration, epplan.manifest, epplan.placement.solve, epplan.topology  # noqa: F401, E401
    # (imported now, while the run trains its first window, not when the first request comes)

    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            return
        pickle.dump(side_planner.propose(request), answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()


if __name__ == "__main__":
    main()
