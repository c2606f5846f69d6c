"""The `eval` node: multiple-choice tasks scored at each evaluation and by `effitrain eval` (tasks.py scores them).

Its schema here (no torch); one node of the top-level config, not a group with options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class EvalConfig:
    """Multiple-choice tasks scored at each evaluation (and by `effitrain eval`)."""

    tasks: List[str] = field(default_factory=list)  # built-in names (next-line) or JSONL task files
    task_items: int = 100  # items per task (a file's first N records)
