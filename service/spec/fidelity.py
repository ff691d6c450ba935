"""Multi-fidelity racing: score each candidate on growing rungs of examples and stop the
weak ones early (asynchronous successive halving; docs/evaluation.md, "Racing")."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evaluators.base import MAX_LIMIT

MAX_ETA = 16


class FidelitySpec(BaseModel):
    """Rungs of ``min_examples`` × ``eta``^k examples per task, up to ``max_examples`` (default:
    the objectives' ``limit``, the full fidelity); after each rung but the last a candidate goes
    on only if it is in the top 1/``eta`` of the candidates that reached that rung."""

    model_config = ConfigDict(extra="forbid")

    min_examples: int = Field(ge=1, le=MAX_LIMIT, description="examples per task of the first rung")
    eta: int = Field(default=3, ge=2, le=MAX_ETA,
                     description="each rung is eta × the previous; 1/eta of the candidates go on")
    max_examples: int | None = Field(
        default=None, ge=2, le=MAX_LIMIT,
        description="examples per task of the last rung (full fidelity); default: each task's limit")

    window: int | None = Field(
        default=None, ge=2, le=100_000,
        description="compare a candidate with the last `window` candidates that reached its rung "
        "(default: all of them). The search improves as it goes: against all of history, most new "
        "candidates go on and racing saves little; a window keeps about 1/eta going on")

    @model_validator(mode="after")
    def _rungs_grow(self) -> FidelitySpec:
        if self.max_examples is not None and self.max_examples <= self.min_examples:
            raise ValueError(f"max_examples ({self.max_examples}) must be above min_examples "
                             f"({self.min_examples}): racing needs at least two rungs")
        return self

    def sizes(self, full: int) -> list[int]:
        """Examples per task of each rung, for a study whose largest task limit is ``full``."""
        top = min(self.max_examples or full, full)
        sizes, n = [self.min_examples], self.min_examples * self.eta
        while n * self.eta <= top:  # a rung less than eta below the top would cost nearly as much
            sizes.append(n)
            n *= self.eta
        return [*sizes, top]


def race_sizes(fidelity: FidelitySpec | None, limits: list[int | float | None]) -> list[int] | None:
    """A study's rung sizes (None: not raced); ``limits``: its objectives' (counts, validated)."""
    if fidelity is None:
        return None
    return fidelity.sizes(max(int(limit) for limit in limits if limit is not None))
