"""Grid search: a coarse full-factorial grid first, refined once it is used up."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loratune.designs import grid_points, spread_subset
from loratune.proposers.base import History, Point, Proposer, positive_int

__all__ = ["GridProposer"]

# Refining stops at this many levels per parameter; beyond it the seeded random top-up of
# ``Proposer`` fills in (only a float space gets that far).
_MAX_LEVELS = 4097


class GridProposer(Proposer):
    """Not-yet-evaluated points of ``grid_points(space, levels_per_dim)``, spread by maximin
    distance from the history; when the grid is used up, the next finer grid that contains
    it (levels 4 -> 7 -> 13 ...)."""

    name = "grid"

    @dataclass(frozen=True)
    class Options:
        levels_per_dim: int = 4

        def __post_init__(self) -> None:
            positive_int("grid", "levels_per_dim", self.levels_per_dim, minimum=2)

    def _candidates(self, history: History, n: int, rng: np.random.Generator) -> list[Point]:
        existing = list(history.evaluated)
        chosen: list[Point] = []
        levels = self.options.levels_per_dim
        previous_size = -1
        while len(chosen) < n and levels <= _MAX_LEVELS:
            grid = grid_points(self.space, levels)
            if len(grid) == previous_size:
                break  # every parameter already shows all its levels: the grid is the space
            picked = spread_subset(
                self.space, grid, n - len(chosen), existing=existing, seed=int(rng.integers(2**31))
            )
            chosen += picked
            existing += picked
            previous_size = len(grid)
            # 2L - 1 levels keep the L old ones: a refined grid adds points between them.
            levels = 2 * levels - 1
        return chosen
