"""A plugin written in this file, with no other file touched, runs a study end to end: once per
plugin kind (merge method, search space, optimizer, evaluator).

Each test registers its plugin for the test only, submits a study that uses it through the REST
app, and runs the real :class:`~service.controller.Controller` until the study completes:
validation, the database, ask / tell, recording and the end of the study are the service's own
code. Only the worker pool is replaced: Ray's worker processes would not know a plugin
registered here, so :class:`InProcessPool` runs each trial in this process with the worker's own
code (:class:`workers.trial.TrialRunner`). Tiny Llama family, SQLite.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluators import registry as evaluator_registry
from evaluators.base import EvaluationResult, Evaluator, ObjectiveScore, Timings
from search_spaces import merge_methods
from search_spaces import optimizers as optimizer_registry
from search_spaces import registry as space_registry
from search_spaces.base import Gene, RecipeNotInSpace, SearchSpace, SpaceSpecBase
from search_spaces.method_declaration import MethodDeclaration, ParamSpec
from search_spaces.optimizers.base import Optimizer, OptimizerError, Point
from search_spaces.recipe import ModelEntry, Recipe
from search_spaces.sources import ModelRef, model_string, source_letter
from service.app import create_app
from service.controller import Controller
from service.db import Study, StudyStatus, Trial, TrialState, make_engine, session_factory
from service.runtime import StudyRuntime, worker_spec_data
from service.spec import StudySpec, StudyValidationError
from tests.api_fixtures import make_settings
from workers import methods
from workers.methods.base import MergeInputs, MergeMethod
from workers.model_io import LazyModel
from workers.trial import TrialRunner, WorkerSpec

NOOP = {"evaluator": "noop", "objectives": [{"task": "fingerprint", "metric": "mean"}]}
EMBEDDINGS = "model.embed_tokens.weight"  # the noop evaluator's fingerprint: the mean of the first parameter
TRIALS = 5


# ---- the service, with trials run in this process --------------------------------------------------
class InProcessPool:
    """``workers.pool.WorkerPool``'s interface over one :class:`TrialRunner` in this process.

    A submitted trial runs at the next ``wait()``. The worker spec, each recipe and each result
    are pickled and unpickled, as Ray's actors receive and return them, so that what the
    controller hands over and gets back is what a real worker would see."""

    def __init__(self, spec: WorkerSpec, n: int) -> None:
        self.runner = TrialRunner(pickle.loads(pickle.dumps(spec)))
        self.slots = [None] * n
        self.running: dict[int, tuple[bytes, int, Any]] = {}  # trial id -> (pickled recipe, attempt, race)

    def idle(self) -> int:
        return len(self.slots) - len(self.running)

    def busy(self) -> bool:
        return bool(self.running)

    def submit(self, trial_id: int, recipe: Any, attempt: int = 1, timeout_s: float | None = None,
               race: Any = None) -> None:
        if not self.idle():
            raise RuntimeError("no idle worker: call idle() before submit()")
        self.running[trial_id] = (pickle.dumps(recipe), attempt, race)

    def wait(self, timeout: float | None = None) -> list[Any]:
        results = []
        for trial_id, (data, attempt, race) in list(self.running.items()):
            result = self._run(trial_id, data, race)
            result.attempts = attempt
            results.append(result)
        self.running.clear()
        return results

    def _run(self, trial_id: int, data: bytes, race: Any = None) -> Any:
        """One trial on the "actor": its pickled recipe in, its result pickled back."""
        return pickle.loads(pickle.dumps(self.runner.run(trial_id, pickle.loads(data), race=race)))

    def shutdown(self) -> None:
        self.running.clear()


class InProcessController(Controller):
    """The controller, unchanged but for where its pools run trials."""

    def _pool(self, rt: StudyRuntime) -> InProcessPool:
        pool = self.pools.get(rt.pool_key)
        if pool is None:
            spec = WorkerSpec.model_validate(worker_spec_data(rt.validated, self.settings, paths=rt.paths))
            pool = self.pools[rt.pool_key] = InProcessPool(spec, rt.parallelism)
        return pool


def status(sessions: Any, study_id: str) -> StudyStatus:
    with sessions() as s:
        return s.get(Study, study_id).status


@pytest.fixture
def run_study(tmp_path, model_root):
    """``run_study(spec) -> (study row, trial rows)``: the spec submitted with ``POST /studies``,
    then the controller stepped until the study completes."""
    url = f"sqlite:///{tmp_path / 'evomerge.db'}"
    settings = make_settings(url, tmp_path, model_root, max_workers=2)

    def run(spec: dict[str, Any]) -> tuple[Study, list[Trial]]:
        with TestClient(create_app(settings, start_controller=False)) as client:
            r = client.post("/studies", json=spec)
            assert r.status_code == 201, r.text
            study_id = r.json()["id"]
        engine = make_engine(url)
        sessions = session_factory(engine)
        controller = InProcessController(settings, sessions)
        try:
            deadline = time.monotonic() + 120
            while status(sessions, study_id) != StudyStatus.COMPLETED:
                assert time.monotonic() < deadline, "the study did not complete"
                controller.step()
        finally:
            controller.stop()
        with sessions() as s:
            study = s.get(Study, study_id)
            trials = list(s.scalars(select(Trial).where(Trial.study_id == study_id).order_by(Trial.number)))
        engine.dispose()
        return study, trials

    return run


@pytest.fixture(scope="module")
def llama(family):
    return family("llama")


def spec_of(llama: tuple[Path, list[Path]], **changes: Any) -> dict[str, Any]:
    """A study over the two experts: a linear merge, one weight gene per source, scored by noop."""
    _, (e0, e1) = llama
    data: dict[str, Any] = {
        "name": "plugin from a test file",
        "sources": [str(e0), str(e1)],
        "space": {"kind": "parameter", "method": "linear", "embedding_genes": False},
        "evaluation": NOOP,
        "optimizer": {"name": "random"},
        "budget": {"max_trials": TRIALS},
        "parallelism": 2,
        "seed": 0,
    }
    data.update(changes)
    return data


def completed(study: Study, trials: list[Trial]) -> None:
    """Every trial of the budget was run and recorded, and the study ended."""
    assert study.status == StudyStatus.COMPLETED
    assert [t.number for t in trials] == list(range(TRIALS))
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.failure_reason for t in trials]
    assert all(t.worker and t.timings["build_s"] > 0 for t in trials)  # built and scored by TrialRunner
    assert study.trials_done == TRIALS and study.trials_failed == 0
    best = max(trials, key=lambda t: t.fitness)
    assert study.best_trial_number == best.number and study.best_value == pytest.approx(best.fitness)


def tensor(model: Path, name: str) -> torch.Tensor:
    lazy = LazyModel(str(model))
    try:
        return lazy.get(name).float()
    finally:
        lazy.close()


def weights(recipe: Mapping[str, Any]) -> dict[str, float]:
    """Model -> its (scalar) weight in a recipe."""
    return {e["model"]: float(e["parameters"]["weight"]) for e in recipe["models"]}


def weighted_sum(recipe: Mapping[str, Any], name: str) -> torch.Tensor:
    """sum(weight_i * model_i) of one tensor, computed here from the sources' files."""
    return sum(w * tensor(Path(model), name) for model, w in weights(recipe).items())


# ---- a merge method ------------------------------------------------------------------------------
class GainSum(MergeMethod):
    """``gain * sum(weight_i * model_i)``."""

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        total = sum(p["weight"] * t for p, t in zip(inputs.model_params, inputs.tensors))
        return inputs.global_params["gain"] * total


GAIN_SUM = MethodDeclaration(
    name="test_gain_sum", implementation=f"{GainSum.__module__}:GainSum",
    description="gain * sum(weight_i * model_i)",
    global_params=(ParamSpec("gain", float, 1.0, help="multiplies the sum"),),
    model_params=(ParamSpec("weight", float, help="this model's weight"),),
    searchable=("weight",), needs_base=False, base_is_input=True, chunked=True,
)


@contextmanager
def method_registered() -> Iterator[MethodDeclaration]:
    merge_methods.register(GAIN_SUM)
    methods.implements(GAIN_SUM.name)(GainSum)
    try:
        yield GAIN_SUM
    finally:
        merge_methods.METHODS.unregister(GAIN_SUM.name)


def test_a_merge_method_from_a_test_file_runs_a_study(llama, run_study):
    with method_registered() as method:
        space = {"kind": "parameter", "method": method.name, "embedding_genes": False,
                 "parameters": {"gain": 0.5}}
        study, trials = run_study(spec_of(llama, space=space))
    assert method.name not in merge_methods.METHODS
    completed(study, trials)
    for t in trials:  # the recipe names the method, and the candidate is what the method makes
        assert t.recipe["merge_method"] == method.name and t.recipe["parameters"] == {"gain": 0.5}
        want = float((0.5 * weighted_sum(t.recipe, EMBEDDINGS)).mean())
        assert t.scores["fingerprint/mean"] == pytest.approx(want, rel=1e-4, abs=1e-8)


# ---- an optimizer --------------------------------------------------------------------------------
class FixedDesign(Optimizer):
    """Proposes a fixed design in order: point k puts gene j at ``(k + 1)(j + 1) / 7`` of its range
    (mod 1). Its state (the next point, the results told) is kept by the caller."""

    names = ("test-fixed-design",)
    persistence = "state"

    def __init__(self, spec: Any, genes: Any, x0: Mapping[str, float] | None = None,
                 state: bytes | None = None) -> None:
        super().__init__(spec, genes, x0)
        saved = json.loads(state) if state else {"next": 0, "told": {}}
        self.next: int = saved["next"]
        self.told: dict[str, list[float] | None] = saved["told"]

    @classmethod
    def create(cls, spec: Any, genes: Any, x0: Mapping[str, float] | None = None,
               **context: Any) -> Optimizer:
        return cls(spec, genes, x0, state=context.get("state"))

    @staticmethod
    def design(genes: Any, k: int) -> dict[str, float]:
        return genes.denormalize([((k + 1) * (j + 1) / 7) % 1 for j in range(len(genes))])

    def _ask_one(self) -> Point:
        k, self.next = self.next, self.next + 1
        return Point(id=k, params=self.design(self.genes, k))

    def _tell(self, point_id: int, values: list[float] | None) -> None:
        if str(point_id) in self.told or point_id >= self.next:
            raise OptimizerError(f"point {point_id} was told already, or never asked")
        self.told[str(point_id)] = values

    def state(self) -> bytes:
        return json.dumps({"next": self.next, "told": self.told}).encode()


@contextmanager
def optimizer_registered() -> Iterator[type[Optimizer]]:
    optimizer_registry.register(FixedDesign)
    try:
        yield FixedDesign
    finally:
        for name in FixedDesign.names:
            optimizer_registry.OPTIMIZERS.unregister(name)


def test_an_optimizer_from_a_test_file_runs_a_study(llama, run_study):
    with optimizer_registered() as optimizer:
        study, trials = run_study(spec_of(llama, optimizer={"name": optimizer.names[0]}))
    assert optimizer.names[0] not in optimizer_registry.OPTIMIZERS
    completed(study, trials)
    genes = sorted(trials[0].params)  # A's weight, B's weight: in [0, 1], so a coordinate is its fraction
    assert len(genes) == 2
    for t in trials:  # the points are the design's, in order
        want = dict(zip(genes, (((t.number + 1) * (j + 1) / 7) % 1 for j in range(2))))
        assert int(t.point_id) == t.number and t.params == pytest.approx(want)
    saved = json.loads(study.optimizer_state)  # kept as the optimizer declares: with the rows
    assert saved["next"] == TRIALS
    assert saved["told"] == {str(t.number): pytest.approx(t.values) for t in trials}


# ---- an evaluator --------------------------------------------------------------------------------
class TensorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tensor: str = Field(min_length=1, description="the parameter scored")
    scale: float = 1.0


class TensorMagnitude(Evaluator):
    """Scores ``scale * mean(|W|)`` of one named parameter of the candidate."""

    name = "test_tensor_magnitude"
    Options = TensorOptions

    def evaluate(self, model: Any, tokenizer: Any) -> EvaluationResult:
        start = time.perf_counter()
        weight = dict(model.named_parameters())[self.options.tensor]
        value = self.options.scale * float(weight.detach().float().abs().mean())
        objectives = [ObjectiveScore(key=o.key, task=o.task, metric=o.metric, value=value, weight=o.weight,
                                     higher_is_better=True) for o in self.spec.objectives]
        return EvaluationResult(
            objectives=objectives, metrics={o.task: {o.metric: value} for o in self.spec.objectives},
            n_examples={o.task: 0 for o in self.spec.objectives},
            timings=Timings(total_s=time.perf_counter() - start, forward_s=0.0, model_calls=0))


@contextmanager
def evaluator_registered() -> Iterator[type[Evaluator]]:
    evaluator_registry.register(TensorMagnitude)
    try:
        yield TensorMagnitude
    finally:
        evaluator_registry.EVALUATORS.unregister(TensorMagnitude.name)


def test_an_evaluator_from_a_test_file_runs_a_study(llama, run_study):
    down = "model.layers.1.mlp.down_proj.weight"
    with evaluator_registered() as evaluator:
        evaluation = {"evaluator": evaluator.name, "objectives": [{"task": "magnitude", "metric": "mean"}],
                      "options": {"tensor": down, "scale": 10.0}}
        study, trials = run_study(spec_of(llama, evaluation=evaluation))
    assert evaluator.name not in evaluator_registry.EVALUATORS
    completed(study, trials)
    for t in trials:  # the scores are the evaluator's function of the merged weights
        merged = weighted_sum(t.recipe, down) / sum(weights(t.recipe).values())  # linear normalises
        want = 10.0 * float(merged.abs().mean())
        assert t.scores == {"magnitude/mean": pytest.approx(want, rel=1e-4)}
        assert t.fitness == pytest.approx(want, rel=1e-4)


# ---- a search space ------------------------------------------------------------------------------
class PerSourceSpec(SpaceSpecBase):
    """One weight per source model, merged by their (unnormalised) weighted sum."""

    kind: Literal["test_per_source"] = "test_per_source"
    models: list[ModelRef] = Field(min_length=1, description="the sources (filled in by the service)")
    weight_range: tuple[float, float] = (0.0, 1.0)


class PerSourceSpace(SearchSpace):
    """One gene per source: its weight in a ``linear`` recipe with ``normalize: false``."""

    kind = "test_per_source"
    spec_class = PerSourceSpec
    derived_fields = ("models",)
    spec: PerSourceSpec

    def planned_dimension(self) -> int:
        return len(self.spec.models)

    def _declare(self) -> list[Gene]:
        low, high = self.spec.weight_range
        return [Gene(name=f"{source_letter(i)}.weight", low=low, high=high,
                     label=f"model {source_letter(i)} · weight",
                     meta={"param": "weight", "model": source_letter(i), "model_ref": model_string(m)})
                for i, m in enumerate(self.spec.models)]

    def _decode(self, values: dict[str, float]) -> Recipe:
        return Recipe(merge_method="linear", parameters={"normalize": False},
                      models=[ModelEntry(model=model_string(m), parameters={"weight": values[g.name]})
                              for m, g in zip(self.spec.models, self.genes)],
                      **self.spec.recipe_fields())

    def encode(self, recipe: Recipe) -> dict[str, float]:
        given = {e.model: e.parameters.get("weight") for e in recipe.models or []}
        if recipe.merge_method != "linear" or set(given) != {model_string(m) for m in self.spec.models}:
            raise RecipeNotInSpace("this space expresses linear recipes of its sources")
        return {g.name: float(given[model_string(m)]) for m, g in zip(self.spec.models, self.genes)}

    def sources(self) -> list[ModelRef]:
        return list(self.spec.models)

    def summary(self) -> str:
        return f"one weight per source: {self.dimension} genes"


@contextmanager
def space_registered() -> Iterator[type[SearchSpace]]:
    space_registry.register_space(PerSourceSpace)
    try:
        yield PerSourceSpace
    finally:
        space_registry.SPACES.unregister(PerSourceSpace.kind)


def test_a_search_space_from_a_test_file_runs_a_study(llama, run_study):
    space = {"kind": PerSourceSpace.kind, "weight_range": [0.5, 2.0]}
    with space_registered():
        study, trials = run_study(spec_of(llama, space=space))
    assert PerSourceSpace.kind not in space_registry.SPACES
    with pytest.raises(StudyValidationError) as refused:  # the service forgets the kind with it
        StudySpec.from_data(spec_of(llama, space=space))
    assert [(p.loc, p.type) for p in refused.value.problems] == [(["space"], "union_tag_invalid")]
    completed(study, trials)
    for t in trials:  # each point is one weight per source, decoded by the space into a linear recipe
        assert sorted(t.params) == ["A.weight", "B.weight"]
        assert all(0.5 <= v <= 2.0 for v in t.params.values())
        assert t.recipe["merge_method"] == "linear" and t.recipe["parameters"] == {"normalize": False}
        given = [e["parameters"]["weight"] for e in t.recipe["models"]]
        assert given == pytest.approx([t.params["A.weight"], t.params["B.weight"]])
        want = float(weighted_sum(t.recipe, EMBEDDINGS).mean())
        assert t.scores["fingerprint/mean"] == pytest.approx(want, rel=1e-4, abs=1e-8)
