"""Sweeps (`effitrain train -m`): which jobs a sweeper will run, checked before any starts (sweepers.py), Optuna's
search, objectives and pruning (trials.py), and each job's outcome and the end-of-sweep table (results.py)."""
