"""The verbs of the CLI, one module each (cli.py parses argv and dispatches here): resume, reproduce, eval
(evaluate.py), compare, the planning verbs estimate/plan/scaling-fit (planning.py, with plan.py and scaling.py), and
what `train -m` reports at a sweep's end (sweep.py). Verbs use the engine and the groups; nothing below imports a
verb."""
