"""Validate a study before any compute: models, compatibility, space, tasks, optimizer, budget.

``validate_study(spec, settings)`` reads only headers (``config.json`` and safetensors
headers, see :mod:`service.model_headers`), builds the search space from the layer counts
it finds, checks the objectives against lm-eval's task index, dry-runs the optimizer
in memory, and plans a worker's memory from the same headers (``workers.memory_plan``,
torch-free: a study that no worker can hold is refused). It collects every problem and
raises one :class:`StudyValidationError`; on success it returns a :class:`ValidatedStudy`
holding what the controller needs: the full space spec, the validated evaluation (and
held-out evaluation), the optimizer spec with its derived fields, the memory plan, and
the fields of a ``workers.trial.WorkerSpec``.

One module per concern, run in this order by :mod:`~service.validation.study`:
:mod:`~service.validation.models` (references, roots, headers, compatibility; paths under
the roots in :mod:`~service.validation.paths`), :mod:`~service.validation.space`,
:mod:`~service.validation.evaluation` (tasks, the evaluator's path options, held-out),
:mod:`~service.validation.optimizer` (and the budget's warnings) and
:mod:`~service.validation.worker` (the memory plan and the worker spec).

Heavy imports: none, except that checking lm-eval tasks imports ``lm_eval.tasks`` (not
torch or transformers) the first time, in :func:`check_evaluation` — the one place it
happens.
"""

from service.spec import StudyValidationError
from service.validation.evaluation import check_evaluation
from service.validation.models import ResolvedModel, SettingsLike, StudyResolver
from service.validation.paths import resolve_under_roots
from service.validation.problems import Loc, Problems
from service.validation.space import DTYPE_NAMES
from service.validation.study import ValidatedStudy, validate_study
from service.validation.worker import worker_limits

__all__ = [
    "DTYPE_NAMES",
    "Loc",
    "Problems",
    "ResolvedModel",
    "SettingsLike",
    "StudyResolver",
    "StudyValidationError",
    "ValidatedStudy",
    "check_evaluation",
    "resolve_under_roots",
    "validate_study",
    "worker_limits",
]
