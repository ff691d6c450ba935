"""Example study specs: the demo study (docs/study-spec.md) and a multi-objective one. They are
the examples of the OpenAPI schema, and tests run them to completion."""

from __future__ import annotations

from typing import Any

# The complete demo study (docs/study-spec.md): TIES over the zoo's two experts, the space
# named by its method only (its defaults: bench/search_quality.py chose them over the zoo family).
DEMO_EXAMPLE: dict[str, Any] = {
    "name": "zoo: xl addition by TIES",
    "sources": ["v2-seed0/math", "v2-seed0/language"],
    "base_model": "v2-seed0/base",
    "space": {"kind": "parameter", "method": "ties"},
    "evaluation": {
        "evaluator": "lm_eval",
        "objectives": [{"task": "zoo_xl_add", "metric": "exact_match", "limit": 200}],
        "options": {"task_dirs": ["evomerge:zoo"]},
    },
    "heldout": {"top_k": 3, "tasks": {"zoo_xl_add": "zoo_xl_add_heldout"}},
    "optimizer": {"name": "optuna-cmaes"},
    "budget": {"max_trials": 300, "max_seconds": 3600},
    "parallelism": 2,
    "seed": 0,
}

MULTI_OBJECTIVE_EXAMPLE: dict[str, Any] = {
    "name": "zoo: xl addition and en addition, Pareto front",
    "sources": ["v2-seed0/math", "v2-seed0/language"],
    "base_model": "v2-seed0/base",
    "space": {"kind": "parameter", "method": "task_arithmetic", "granularity": 2},
    "evaluation": {
        "objectives": [
            {"task": "zoo_xl_add", "metric": "exact_match", "limit": 100},
            {"task": "zoo_en_add", "metric": "exact_match", "limit": 100},
        ],
        "options": {"task_dirs": ["evomerge:zoo"]},
    },
    "multi_objective": True,
    "heldout": {"top_k": 5},
    "optimizer": {"name": "nsga2", "population_size": 16},
    "budget": {"max_trials": 400},
    "parallelism": 4,
    "seed": 1,
}

