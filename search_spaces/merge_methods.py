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

# ---- RAM and RAM+ (workers/methods/ram.py) ----------------------------------------------
_RAM = "https://arxiv.org/abs/2601.13572"
# An absolute threshold on |model − base|: mergekit's default counts nearly every entry a
# fine-tune moved; 0.1 is far beyond the typical entry of a task vector (the searched range
# of RAM's epsilon: from "every change counts" to "only the largest do")
RAM_EPSILON = ParamSpec("epsilon", float, 1e-5, 0.0, 0.1,
                        help="a task-vector entry counts when its magnitude exceeds this")
register(MethodDeclaration(
    name="ram", implementation="workers.methods.ram:Ram",
    description="each entry: the task vector that alone moves it (|δ| > epsilon), else the mean of those "
                "that do",
    reference=_RAM, global_params=(RAM_EPSILON,), searchable=("epsilon",), chunked=True,
))
register(MethodDeclaration(
    name="ramplus_tl", implementation="workers.methods.ram:RamPlusTL",
    description="RAM, each model's unique entries scaled by 1 + r·min(shared/unique, alpha), counted "
                "per tensor",
    reference=_RAM,
    global_params=(
        ParamSpec("r", float, 0.1, 0.0, 2.0, help="how much a model's overlap rescales its unique entries"),
        ParamSpec("alpha", float, 0.2, 0.0, 2.0, help="cap on a model's shared/unique entry ratio"),
        RAM_EPSILON,
    ),
    # epsilon stays a fixed parameter here (a spec may set it): r and alpha are what RAM+ adds
    searchable=("r", "alpha"), chunked=True,
))

# ---- SCE, Arcee Fusion, NearSwap (workers/methods/sce.py, arcee_fusion.py, nearswap.py) ----
register(MethodDeclaration(
    name="sce", implementation="workers.methods.sce:Sce",
    description="keep the select_topk share of entries that vary most across the task vectors, elect "
                "signs, average the agreeing entries weighted by each task vector's mean square",
    reference="https://arxiv.org/abs/2408.07990",
    global_params=(
        ParamSpec("select_topk", float, 1.0, 0.0, 1.0,
                  help="share of the entries of non-zero variance kept, by variance across the task vectors"),
        ParamSpec("int8_mask", bool, False, help="accepted for mergekit compatibility"),
    ),
    searchable=("select_topk",), forms_task_vectors=True, chunked=True,
))
register(MethodDeclaration(
    name="arcee_fusion", implementation="workers.methods.arcee_fusion:ArceeFusion",
    description="the other model's entries whose importance (|change| × the row's KL divergence) reaches "
                "median + 1.5 IQR, the base's elsewhere",
    reference="https://arcee.ai", min_models=1, max_models=1, chunked=True,
))
register(MethodDeclaration(
    name="nearswap", implementation="workers.methods.nearswap:NearSwap",
    description="the other model's value where it lies within t of the base's, else a step of t toward it",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    # searched in the spec's t_range; fine-tunes move most entries by less than 1e-2, so a
    # search starts where NearSwap takes some entries and leaves others
    global_params=(ParamSpec("t", float, minimum=0.0, start=0.001,
                             help="distance within which the other model's value is taken"),),
    searchable=("t",), min_models=1, max_models=1, chunked=True,
))

# ---- NuSLERP, Multi-SLERP, Karcher mean (workers/methods/nuslerp.py, multislerp.py, karcher.py) ----
# Each output is a linear combination of the inputs (of their task vectors with a base)
# whose coefficients come from the inputs' norms and angles, found first (workers.methods.spherical):
# chunked, each chunk one fused kernel. With a base_model they interpolate task vectors, without
# one the models themselves (mergekit's optional base).
_SPHERE_WEIGHT = ParamSpec("weight", float, help="this model's weight (its share of the weights)")
register(MethodDeclaration(
    name="nuslerp", implementation="workers.methods.nuslerp:NuSlerp",
    description="SLERP between two models at t = weight_2 / (weight_1 + weight_2); of their task vectors "
                "when base_model is given",
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp-nuslerp",
    global_params=(
        ParamSpec("nuslerp_flatten", bool, True,
                  help="one angle for the whole tensor; false: one per row (or per column, row_wise)"),
        ParamSpec("nuslerp_row_wise", bool, False,
                  help="without flatten: interpolate the vectors along the first dimension"),
    ),
    model_params=(_SPHERE_WEIGHT,), searchable=("weight",), needs_base=False, min_models=2, max_models=2,
    chunked=True, fused=True,
))
register(MethodDeclaration(
    name="multislerp", implementation="workers.methods.multislerp:MultiSlerp",
    description="barycentric interpolation on the hypersphere: the weighted mean of the unit inputs, "
                "moved along the sphere by their weighted tangents, scaled to their weighted norm",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    global_params=(
        ParamSpec("normalize_weights", bool, True, help="divide the weights by their sum"),
        ParamSpec("eps", float, 1e-8, 0.0, 1.0, help="numerical floor of norms (mergekit's eps)"),
    ),
    model_params=(_SPHERE_WEIGHT,), searchable=("weight",), needs_base=False, chunked=True, fused=True,
))
register(MethodDeclaration(
    name="karcher", implementation="workers.methods.karcher:Karcher",
    description="weighted Riemannian (Karcher) mean of the models' directions on the hypersphere, "
                "scaled to their weighted norm",
    reference="https://arxiv.org/abs/2603.04972",
    global_params=(
        ParamSpec("max_iter", int, 10, 0, 1000, help="iterations of the fixed-point search"),
        ParamSpec("tol", float, 1e-5, 0.0, 1.0, help="stops when the step is below it; smaller norms "
                                                     "and angles are skipped"),
    ),
    # evomerge's addition: mergekit's karcher weighs every model equally (weight 1 each);
    # weights equal anywhere give that mean, so a search starts at 0.5 in its range
    model_params=(ParamSpec("weight", float, 1.0, 0.0, start=0.5,
                            help="this model's share of the mean (evomerge; mergekit: equal)"),),
    searchable=("weight",), needs_base=False, base_is_input=True, chunked=True, fused=True,
))

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
