"""Task metrics of trained adapters through lm-evaluation-harness (offline, local task files).

``tasks`` knows loratune's own tasks (built from a study's held-out split) and reads a user's
task folder; ``harness`` runs lm-eval on a saved adapter and returns the evaluation record.
lm-eval and torch are imported on first use, so config checks stay cheap.
"""

from loratune.evaluation.harness import evaluate_adapter, flatten, metric_column, parse_metric_column
from loratune.evaluation.tasks import BUILTIN_TASKS, TaskError, task_config_fingerprint, task_metrics

__all__ = [
    "BUILTIN_TASKS",
    "TaskError",
    "evaluate_adapter",
    "flatten",
    "metric_column",
    "parse_metric_column",
    "task_config_fingerprint",
    "task_metrics",
]
