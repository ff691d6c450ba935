"""The race a worker runs for one candidate: rung sizes, and who goes on after each rung.

Asynchronous successive halving (ASHA, Li et al. 2020) in the form of Optuna's
``SuccessiveHalvingPruner``: after rung k a candidate continues if its value is in the top
1/eta of the values recorded at rung k (its own included, ranked after the values it
ties; the first candidates to reach a rung go on when they beat every recorded one). No
worker waits for a rung to fill: the controller hands each dispatch a :class:`RaceTicket`
with the best values recorded so far at each rung, and the worker decides on its own,
between rungs, while the candidate is still built. Values are the study's fitness
(higher is better).

Light on purpose (pydantic only): the controller builds tickets without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field

MAX_RUNGS = 32
MAX_TOP = 100_000


class RaceTicket(BaseModel):
    """What a worker needs to race one candidate: the rungs, and the competition so far."""

    sizes: list[int] = Field(min_length=2, max_length=MAX_RUNGS, description="examples per task, per rung")
    eta: int = Field(ge=2, le=16)
    reached: list[int] = Field(default_factory=list, description="per rung, candidates recorded there")
    tops: list[list[float]] = Field(default_factory=list,
                                    description="per rung, the best recorded values, descending, "
                                    "as many as a decision there needs")

    def goes_on(self, rung: int, value: float) -> bool:
        """After rung ``rung`` (not the last), does a candidate with ``value`` continue?"""
        reached = self.reached[rung] if rung < len(self.reached) else 0
        top = self.tops[rung] if rung < len(self.tops) else []
        return promotable(value, reached, top, self.eta)


def promotable(value: float, reached: int, top: Sequence[float], eta: int) -> bool:
    """In the top 1/eta of ``reached`` recorded values plus this one (at least the best one),
    ties ranked after the recorded values?"""
    promote = max((reached + 1) // eta, 1)
    if len(top) < min(promote, reached):
        raise ValueError(f"a decision among {reached} needs the best {min(promote, reached)} values, "
                         f"got {len(top)}")
    if reached < promote:
        return True  # every recorded one and this one fit in the promoted share
    # a tie ranks the newcomer last: on a plateau (every candidate scoring 0, say) ties would
    # otherwise promote every candidate and racing would save nothing
    return value > top[promote - 1]


def ticket(sizes: Sequence[int], eta: int, recorded: Sequence[Sequence[float]]) -> RaceTicket:
    """A ticket from every value recorded at each rung (``recorded[k]``: rung k, any order)."""
    reached, tops = [], []
    for values in recorded[:len(sizes) - 1]:
        keep = min(max((len(values) + 1) // eta, 1), len(values), MAX_TOP)
        reached.append(len(values))
        tops.append(sorted(values, reverse=True)[:keep])
    return RaceTicket(sizes=list(sizes), eta=eta, reached=reached, tops=tops)
