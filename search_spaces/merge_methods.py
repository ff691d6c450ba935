"""The merge methods: one :class:`MethodDeclaration` each, registered by name.

Adding a method is writing its declaration here (or registering one with
:func:`register` at run time) and its arithmetic in one small module of
``workers/methods/`` (a ``MergeMethod`` subclass decorated with ``@implements(name)``).
Everything that needs a fact about a method reads it from here: the parameter space,
the memory planner, the mergekit writer, the export card and the merge engine.

The defaults of each task-vector variant follow mergekit's.
"""

from __future__ import annotations

from search_spaces.method_declaration import REQUIRED, MergeError, MethodDeclaration, ParamSpec
from search_spaces.plugin_registry import Registry

METHODS: Registry[MethodDeclaration] = Registry(
    "merge method", error=MergeError, known="Known methods", max_close=3)


def register(declaration: MethodDeclaration) -> MethodDeclaration:
    """Make a method known under its ``name`` (a second declaration of a name is refused)."""
    return METHODS.register(declaration)


def get(name: str) -> MethodDeclaration:
    """A method's declaration; an unknown name raises :class:`MergeError` with the close
    matches."""
    return METHODS.get(name)


def names() -> list[str]:
    return METHODS.names()


def declarations() -> list[MethodDeclaration]:
    """Every declaration, in registration order."""
    return METHODS.values()


def find(name: str) -> MethodDeclaration | None:
    """A method's declaration, or None for a name no method has."""
    return METHODS.get(name) if name in METHODS else None


# ---- the built-in methods ---------------------------------------------------------------
# How workers.sparsify restores the mass that sparsification drops.
RESCALE_MODES = ("l1", "inverse_density")

WEIGHT = ParamSpec("weight", float, help="scale of this model's task vector", start=1.0)
# A search of task vectors starts at task arithmetic (every weight 1) and may subtract a
# harmful one or amplify a useful one (bench/search_quality.py measured the range)
TASK_VECTOR_WEIGHTS = (-0.5, 3.0)
DENSITY = ParamSpec("density", float, 1.0, 0.0, 1.0, help="share of the task vector kept")
GAMMA = ParamSpec("gamma", float, 0.01, 0.0, 1.0, help="share of largest entries dropped")
EPSILON = ParamSpec("epsilon", float, 0.15, 0.0, 0.5, help="spread of keep probabilities")


def _task_vector_globals(normalize: bool, rescale: bool) -> tuple[ParamSpec, ...]:
    return (
        ParamSpec("normalize", bool, normalize, help="divide by the summed weights"),
        ParamSpec("rescale", bool, rescale, help="restore the mass that sparsification drops"),
        ParamSpec(
            "rescale_mode",
            str,
            "l1",
            choices=RESCALE_MODES,
            help="l1: match the L1 norm (mergekit); inverse_density: divide by the keep "
            "probability (the DARE / DELLA papers)",
        ),
        ParamSpec("lambda", float, 1.0, help="scale of the combined task vector"),
        ParamSpec("int8_mask", bool, False, help="accepted for mergekit compatibility"),
    )


def _task_vector(name: str, cls: str, description: str, reference: str, *, normalize: bool,
                 rescale: bool, model_params: tuple[ParamSpec, ...], random: bool = False,
                 trims_by_magnitude: bool = False) -> MethodDeclaration:
    """A method of workers/methods/task_arithmetic.py: chunked, fused unless it draws
    random masks (drawn eagerly), weights and densities searched."""
    return MethodDeclaration(
        name=name, implementation=f"workers.methods.task_arithmetic:{cls}",
        description=description, reference=reference,
        global_params=_task_vector_globals(normalize, rescale), model_params=model_params,
        searchable=("weight", "density"), random=random, trims_by_magnitude=trims_by_magnitude,
        forms_task_vectors=True, chunked=True, fused=not random,
        search_weight_range=TASK_VECTOR_WEIGHTS,
        # normalised, the weights only set ratios and the merge never exceeds the mean of the
        # task vectors: a search adds them (normalize: true stays one setting away)
        search_parameters={"normalize": False} if normalize else {},
    )


_DARE = "https://arxiv.org/abs/2311.03099"
_BREADCRUMBS = "https://arxiv.org/abs/2312.06795"
_DELLA = "https://arxiv.org/abs/2406.11617"

# The order is the order users see (the parameter space's list of methods).
for _declaration in (
    MethodDeclaration(
        name="linear", implementation="workers.methods.linear:Linear",
        description="sum(weight_i * model_i) / sum(weight_i)",
        reference="https://arxiv.org/abs/2203.05482",
        global_params=(ParamSpec("normalize", bool, True, help="divide by the summed weights"),),
        model_params=(ParamSpec("weight", float, help="this model's weight"),),
        searchable=("weight",), needs_base=False, base_is_input=True, chunked=True, fused=True,
    ),
    MethodDeclaration(
        name="task_arithmetic", implementation="workers.methods.task_arithmetic:TaskArithmetic",
        description="base + lambda * sum(weight_i * (model_i - base))",
        reference="https://arxiv.org/abs/2212.04089",
        global_params=_task_vector_globals(normalize=False, rescale=False), model_params=(WEIGHT,),
        searchable=("weight",), forms_task_vectors=True, chunked=True, fused=True,
        search_weight_range=TASK_VECTOR_WEIGHTS,
    ),
    _task_vector("ties", "Ties",
                 "trim each task vector by magnitude, elect signs, average the agreeing part",
                 "https://arxiv.org/abs/2306.01708", normalize=True, rescale=False,
                 model_params=(WEIGHT, DENSITY), trims_by_magnitude=True),
    _task_vector("dare_ties", "DareTies",
                 "drop task-vector entries at random (seeded), rescale, TIES sign election",
                 _DARE, normalize=False, rescale=True, model_params=(WEIGHT, DENSITY), random=True),
    _task_vector("dare_linear", "DareLinear",
                 "drop task-vector entries at random (seeded), rescale, add",
                 _DARE, normalize=False, rescale=True, model_params=(WEIGHT, DENSITY), random=True),
    _task_vector("breadcrumbs", "Breadcrumbs",
                 "drop the largest (gamma) and smallest task-vector entries, add",
                 _BREADCRUMBS, normalize=False, rescale=False, model_params=(WEIGHT, DENSITY, GAMMA),
                 trims_by_magnitude=True),
    _task_vector("breadcrumbs_ties", "BreadcrumbsTies",
                 "Model Breadcrumbs with TIES sign election",
                 _BREADCRUMBS, normalize=False, rescale=False, model_params=(WEIGHT, DENSITY, GAMMA),
                 trims_by_magnitude=True),
    _task_vector("della", "Della",
                 "magnitude-ranked random drop (seeded), rescale, TIES sign election",
                 _DELLA, normalize=True, rescale=True, model_params=(WEIGHT, DENSITY, EPSILON),
                 random=True),
    _task_vector("della_linear", "DellaLinear",
                 "magnitude-ranked random drop (seeded), rescale, add",
                 _DELLA, normalize=False, rescale=True, model_params=(WEIGHT, DENSITY, EPSILON),
                 random=True),
    MethodDeclaration(
        name="slerp", implementation="workers.methods.slerp:Slerp",
        description="spherical linear interpolation from the base (t=0) to the other model (t=1)",
        reference="https://en.wikipedia.org/wiki/Slerp",
        global_params=(ParamSpec("t", float, minimum=0.0, maximum=1.0, start=0.5,
                                 help="interpolation factor"),),
        searchable=("t",), min_models=1, max_models=1,
    ),
    MethodDeclaration(
        name="model_stock", implementation="workers.methods.model_stock:ModelStock",
        description="t * mean(models) + (1 - t) * base, t = k cos / (1 + (k - 1) cos)",
        reference="https://arxiv.org/abs/2403.19522",
        global_params=(ParamSpec("filter_wise", bool, False,
                                 help="one ratio per output row, not per tensor"),),
        min_models=2,
    ),
    MethodDeclaration(
        name="passthrough", implementation="workers.methods.passthrough:Passthrough",
        description="copy layers from slices of the sources, renumbered; optional scales",
        model_params=(ParamSpec("scale", float, 1.0, help="multiplies the tensor (mergekit)"),),
        needs_base=False, base_is_input=True, max_models=1, chunked=True,
    ),
):
    register(_declaration)
del _declaration

__all__ = [
    "METHODS",
    "REQUIRED",
    "RESCALE_MODES",
    "MergeError",
    "MethodDeclaration",
    "ParamSpec",
    "declarations",
    "find",
    "get",
    "names",
    "register",
]
