"""Mean log-likelihood of given texts: a direct, lm-eval-free evaluator.

Objectives name a text set (``options.texts`` inline, or ``options.text_files``: a
``.txt`` file with one text per line, or a ``.jsonl`` file with a ``text`` field) and a
metric: ``loglik_per_token`` (total log-probability / scored tokens), ``loglik`` (mean
log-probability of a text) or ``perplexity`` (exp of minus ``loglik_per_token``, lower is
better). Texts are tokenized without special tokens; with ``prefix: none`` the first
token of each text is context only, with ``bos``/``eos`` that token is prepended and
every text token is scored.
"""

from __future__ import annotations

import difflib
import json
import math
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from evaluators.base import (
    EvaluationError,
    EvaluationResult,
    EvaluationSpec,
    Evaluator,
    ObjectiveScore,
    PathOption,
    SpecError,
    Timings,
    failures_as_evaluation_errors,
)
from evaluators.registry import register
from evaluators.subsets import select_indices

METRICS: dict[str, bool] = {"loglik_per_token": True, "loglik": True, "perplexity": False}
_MAX_LOGIT_ELEMENTS = 1 << 26  # log-softmax in chunks of at most this many float32 values


class LoglikOptions(BaseModel):
    """``EvaluationSpec.options`` of the log-likelihood evaluator."""

    model_config = ConfigDict(extra="forbid", strict=True)

    texts: dict[str, Annotated[list[str], Field(max_length=1024)]] = Field(default_factory=dict,
                                                                           max_length=32)
    text_files: dict[str, str] = Field(default_factory=dict, max_length=32)
    prefix: Literal["none", "bos", "eos"] = "none"
    # keep at most this many tokens of a text
    max_length: int | None = Field(default=None, ge=2, le=1_000_000)


def _read_texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        missing = [i for i, r in enumerate(rows) if not isinstance(r, dict) or "text" not in r]
        if missing:
            raise SpecError(f"{path}: rows {missing[:5]} have no 'text' field")
        return [str(r["text"]) for r in rows]
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _close(word: str, pool: list[str]) -> str:
    close = difflib.get_close_matches(word, pool, n=3, cutoff=0.5)
    return f" Close matches: {', '.join(close)}." if close else ""


@register
class LoglikEvaluator(Evaluator):
    """Scores objectives that are the log-likelihood of named text sets."""

    name = "loglik"
    Options = LoglikOptions
    path_options = (PathOption("text_files", holds="mapping", points_to="file", what="text file"),)

    @classmethod
    def validate(cls, spec: EvaluationSpec) -> EvaluationSpec:
        options = cls.Options.model_validate(spec.options)
        both = sorted(set(options.texts) & set(options.text_files))
        if both:
            raise SpecError(f"text sets {both} are given both inline and as files; keep one")
        for name, file in options.text_files.items():
            if not Path(file).expanduser().is_file():
                raise SpecError(f"text set {name!r}: file {file!r} does not exist")
        sets = sorted([*options.texts, *options.text_files])
        problems, objectives = [], []
        for o in spec.objectives:
            if o.task not in sets:
                problems.append(f"unknown text set {o.task!r}.{_close(o.task, sets)} "
                                f"Known: {', '.join(sets) or '(none: set options.texts or text_files)'}")
            elif o.metric not in METRICS:
                problems.append(f"unknown metric {o.metric!r} for text set {o.task!r}."
                                f"{_close(o.metric, list(METRICS))} Known: {', '.join(METRICS)}")
            elif o.num_fewshot or o.split:
                problems.append(f"objective {o.key}: num_fewshot and split do not apply to text sets")
            elif spec.subset == "holdout" and o.limit is None:
                problems.append(f"objective {o.key}: a held-out score needs a search `limit`")
            else:
                hib = METRICS[o.metric] if o.higher_is_better is None else o.higher_is_better
                objectives.append(o.model_copy(update={"higher_is_better": hib}))
        if problems:
            raise SpecError("; ".join(problems))
        files = {k: str(Path(v).expanduser().resolve()) for k, v in options.text_files.items()}
        return spec.model_copy(update={"objectives": objectives,
                                       "options": {**spec.options, "text_files": files}})

    def __init__(self, spec: EvaluationSpec) -> None:
        super().__init__(spec)
        self.options: LoglikOptions
        self.spec = self.validate(spec)
        self._tokenizer = None
        self._batches: dict[str, list[dict[str, Any]]] = {}
        self._counts: dict[str, int] = {}

    def _texts(self, name: str) -> list[str]:
        if name in self.options.texts:
            return list(self.options.texts[name])
        return _read_texts(Path(self.options.text_files[name]).expanduser())

    def _prepare(self, tokenizer) -> None:
        """Tokenize and batch each text set once per tokenizer."""
        import torch

        heads = {"none": None, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
        head = heads[self.options.prefix]
        if self.options.prefix != "none" and head is None:
            raise SpecError(f"prefix {self.options.prefix!r}: the tokenizer has no such token")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        limits = {o.task: o.limit for o in self.spec.objectives}
        self._batches, self._counts = {}, {}
        for name, limit in limits.items():
            texts = self._texts(name)
            chosen = select_indices(len(texts), limit, self.spec.seed, name, self.spec.subset)
            texts = texts if chosen is None else [texts[i] for i in chosen]
            seqs = []
            for text in texts:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids = ids if head is None else [head, *ids]
                if self.options.max_length:
                    ids = ids[: self.options.max_length]
                if len(ids) >= 2:
                    seqs.append(ids)
            if not seqs:
                raise SpecError(f"text set {name!r} has no text of two or more tokens to score")
            seqs.sort(key=len, reverse=True)
            batches = []
            for start in range(0, len(seqs), self.spec.batch_size):
                chunk = seqs[start:start + self.spec.batch_size]
                width = len(chunk[0])
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, s in enumerate(chunk):
                    ids[i, : len(s)] = torch.tensor(s)
                    mask[i, : len(s)] = 1
                batches.append({"input_ids": ids, "attention_mask": mask, "scored": mask[:, 1:].bool()})
            self._batches[name] = batches
            self._counts[name] = len(seqs)
        self._tokenizer = tokenizer

    def prepare(self, model, tokenizer) -> float:
        start = time.perf_counter()
        with failures_as_evaluation_errors():
            if tokenizer is not self._tokenizer:
                self._prepare(tokenizer)
        return time.perf_counter() - start

    @staticmethod
    def _score_batch(model, batch: dict[str, Any]) -> tuple[list[float], list[int]]:
        import torch

        device = model.device
        ids = batch["input_ids"].to(device)
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits[:, :-1]
        targets = ids[:, 1:]
        scored = batch["scored"].to(device)
        rows = max(1, _MAX_LOGIT_ELEMENTS // max(1, logits.shape[1] * logits.shape[2]))
        sums = []
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start:start + rows].float()
            logp = chunk.gather(-1, targets[start:start + rows, :, None])[..., 0] - chunk.logsumexp(-1)
            sums.append(torch.where(scored[start:start + rows], logp, 0.0).sum(-1))
        return torch.cat(sums).tolist(), scored.sum(-1).tolist()

    def evaluate(self, model, tokenizer) -> EvaluationResult:
        import torch

        from evaluators.runtime.timing import ForwardTimer

        start = time.perf_counter()
        with failures_as_evaluation_errors():
            prepare_s = self.prepare(model, tokenizer) if tokenizer is not self._tokenizer else 0.0
            model.eval()
            metrics: dict[str, dict[str, float]] = {}
            with ForwardTimer(model) as timer, torch.inference_mode():
                for name, batches in self._batches.items():
                    per_text, tokens = [], 0
                    for batch in batches:
                        sums, counts = self._score_batch(model, batch)
                        per_text += sums
                        tokens += sum(counts)
                    per_token = math.fsum(per_text) / tokens
                    metrics[name] = {
                        "loglik_per_token": per_token,
                        "loglik": math.fsum(per_text) / len(per_text),
                        "perplexity": math.exp(-per_token) if per_token > -700 else math.inf,
                    }
        objectives = []
        for o in self.spec.objectives:
            value = metrics[o.task][o.metric]
            if not math.isfinite(value):
                raise EvaluationError(f"metric {o.metric!r} is {value}", task=o.task)
            objectives.append(ObjectiveScore(key=o.key, task=o.task, metric=o.metric, value=value,
                                             weight=o.weight, higher_is_better=bool(o.higher_is_better)))
        return EvaluationResult(
            objectives=objectives,
            metrics={k: {m: v for m, v in d.items() if math.isfinite(v)} for k, d in metrics.items()},
            n_examples=dict(self._counts),
            timings=Timings(total_s=time.perf_counter() - start, forward_s=timer.seconds,
                            model_calls=timer.calls, prepare_s=prepare_s),
            tokens=timer.tokens,
        )
