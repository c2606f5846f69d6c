"""Sweeps' machinery (`effitrain train -m`): which jobs a sweeper will run, checked before any starts (sweepers.py),
and Optuna's search, objectives and pruning (trials.py). A sweep's results -- each job's outcome, the end-of-sweep
table, sweep.resume -- are the verb's (commands/sweep.py)."""
