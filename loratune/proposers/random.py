"""Random search: the baseline every model-based proposer has to beat."""

from __future__ import annotations

import numpy as np

from loratune.proposers.base import History, Point, Proposer, random_new_points

__all__ = ["RandomProposer"]


class RandomProposer(Proposer):
    """Uniform in the unit cube (log-uniform for log parameters), snapped, distinct, new."""

    name = "random"

    def _candidates(self, history: History, n: int, rng: np.random.Generator) -> list[Point]:
        taken = {self.space.key(p) for p in history.evaluated}
        return random_new_points(self.space, n, taken, rng)
