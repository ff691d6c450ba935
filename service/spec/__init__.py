"""The study spec: what a user submits (JSON or YAML), and how its errors are reported.

The spec is the user's form of a study: models by path or hub id, the search space
without what the service derives from the models (layer counts, the model lists), the
objectives, the optimizer, the budget. Parsing checks shapes only; everything that needs
the models, the task index or the server's settings is checked by
:func:`service.validation.validate_study`. Both report :class:`Problem` objects — where
(``loc``, as in FastAPI's 422 ``detail``), what is wrong (``msg``) and how to fix it
(``fix``) — collected in a :class:`StudyValidationError`.

The modules: :mod:`~service.spec.study` (the spec's fields), :mod:`~service.spec.forms`
(the user's form of the models and of each search space), :mod:`~service.spec.text`
(YAML / JSON), :mod:`~service.spec.problems` and :mod:`~service.spec.pydantic_errors` (how
errors are reported), :mod:`~service.spec.examples`, :mod:`~service.spec.bounds`.

This package imports pydantic, PyYAML and the (pure Python) search-space and evaluator
specs; never torch, ray or lm_eval.
"""

from service.spec.bounds import MAX_HELDOUT_TOP_K, MAX_PARALLELISM, MAX_SECONDS, MAX_SOURCES, MAX_TRIALS
from service.spec.examples import DEMO_EXAMPLE, MULTI_OBJECTIVE_EXAMPLE
from service.spec.forms import DERIVED_FIELDS, SPACE_FORMS, ModelPath, SourceRef, SpaceForm, derived_fields
from service.spec.problems import Problem, StudyValidationError
from service.spec.pydantic_errors import problems_from_pydantic
from service.spec.study import Budget, HeldoutSpec, StudySpec, WorkerOptions
from service.spec.text import parse_text

__all__ = [
    "DEMO_EXAMPLE",
    "DERIVED_FIELDS",
    "MAX_HELDOUT_TOP_K",
    "MAX_PARALLELISM",
    "MAX_SECONDS",
    "MAX_SOURCES",
    "MAX_TRIALS",
    "MULTI_OBJECTIVE_EXAMPLE",
    "SPACE_FORMS",
    "Budget",
    "HeldoutSpec",
    "ModelPath",
    "Problem",
    "SourceRef",
    "SpaceForm",
    "StudySpec",
    "StudyValidationError",
    "WorkerOptions",
    "derived_fields",
    "parse_text",
    "problems_from_pydantic",
]
