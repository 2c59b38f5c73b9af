"""Training runs: ``epplan run`` launches ``epplan.train.worker`` through torchrun.

Modules: ``options`` (a run's flags), ``job`` (what a run takes from the manifest; process ->
rank mapping), ``launch`` (torchrun command lines, sbatch scripts, pre-launch checks),
``worker`` (the torchrun entry point), ``trainer`` (the loop), ``data``, ``checkpoint``,
``metrics``.
"""
