"""Pilot designs: the first points of every seed, before any model has seen data.

All designs work in the unit cube of ``SearchSpace`` and snap their points, so a rank on a
step of 4, an alpha from its set and a log-scaled learning rate come out valid. They are
deterministic for a seed and never repeat a point (by ``space.key``).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Container, Iterable, Mapping

import numpy as np

from loratune.space import SearchSpace

__all__ = ["DESIGNS", "pilot_design", "grid_points", "spread_subset", "unlisted_points"]

DESIGNS = ("random_sets", "random", "lhs", "scipy_lhs", "grid")

# A float space is uncountable in principle, but snapping to a few digits makes it finite; a
# sampler that finds nothing new for this many batches in a row has in effect exhausted it.
_STALLED_BATCHES = 50
# Up to this many points, a finite space is small enough to list when sampling stalls.
_LISTABLE = 1_000_000

Point = dict[str, Any]


def pilot_design(space: SearchSpace, n: int, method: str, seed: int) -> list[Point]:
    """``n`` distinct points (fewer only when the space has fewer) drawn by ``method``."""
    if method not in DESIGNS:
        raise ValueError(f"pilot.design: unknown {method!r}; choose one of {list(DESIGNS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"pilot.n: must be an integer >= 0, got {n!r}")
    n = int(n)
    if space.cardinality is not None:
        n = min(n, space.cardinality)
    if n == 0:
        return []
    if method == "grid":
        return _grid_design(space, n, seed)
    rng = np.random.default_rng(seed)
    draw = {
        "random_sets": _draw_levels,
        "random": _draw_uniform,
        "lhs": _draw_latin_hypercube,
        "scipy_lhs": _draw_scipy_latin_hypercube,
    }[method]
    return _distinct_draws(space, n, lambda count: draw(space, count, rng), rng)


def grid_points(space: SearchSpace, levels_per_dim: int = 4) -> list[Point]:
    """The full-factorial grid: per tunable parameter, ``levels_per_dim`` evenly spaced unit
    coordinates, snapped (a parameter with fewer levels contributes all of them)."""
    if isinstance(levels_per_dim, bool) or int(levels_per_dim) != levels_per_dim or levels_per_dim < 1:
        raise ValueError(f"grid levels_per_dim: must be an integer >= 1, got {levels_per_dim!r}")
    axes = [_axis_values(param, int(levels_per_dim)) for param in space.tunable]
    points: dict[tuple, Point] = {}
    for combination in itertools.product(*axes):
        point = space.snap(dict(zip(space.tunable_names, combination)))
        points.setdefault(space.key(point), point)
    return list(points.values())


def spread_subset(
    space: SearchSpace,
    candidates: Iterable[Mapping[str, Any]],
    n: int,
    existing: Iterable[Mapping[str, Any]] = (),
    seed: int = 0,
) -> list[Point]:
    """Up to ``n`` candidates chosen greedily by maximin distance in the unit cube.

    Each step takes the candidate whose nearest neighbour among ``existing`` and the points
    already chosen is farthest away; equal distances are broken by a seeded draw. Candidates
    that are in ``existing`` (or repeat one another) are never chosen.
    """
    if n <= 0:
        return []
    existing = _as_points(existing)
    taken = {space.key(point) for point in existing}
    pool: dict[tuple, Point] = {}
    for candidate in _as_points(candidates):
        point = space.snap(candidate)
        key = space.key(point)
        if key not in taken:
            pool.setdefault(key, point)
    if not pool:
        return []
    points = list(pool.values())
    X = space.to_unit_rows(points)
    anchors = space.to_unit_rows(existing)
    nearest = np.full(len(points), np.inf)
    for anchor in anchors:
        nearest = np.minimum(nearest, np.linalg.norm(X - anchor, axis=1))

    rng = np.random.default_rng(seed)
    available = np.ones(len(points), dtype=bool)
    chosen: list[Point] = []
    while len(chosen) < n and available.any():
        best = np.max(nearest[available])
        if np.isinf(best):
            tied = np.flatnonzero(available)
        else:
            # Distances on a grid tie in exact arithmetic; allow for rounding.
            tied = np.flatnonzero(available & (nearest >= best - 1e-12 * max(1.0, best)))
        pick = int(rng.choice(tied))
        chosen.append(points[pick])
        available[pick] = False
        nearest = np.minimum(nearest, np.linalg.norm(X - X[pick], axis=1))
    return chosen


# ---- the samplers ---------------------------------------------------------------------


def _draw_levels(space: SearchSpace, count: int, rng: np.random.Generator) -> list[Point]:
    """Each parameter uniformly from its levels; floats uniformly in their unit encoding."""
    columns = {}
    for param in space.tunable:
        if param.levels is None:
            columns[param.name] = [param.from_unit(u) for u in rng.random(count)]
        else:
            levels = param.levels
            columns[param.name] = [levels[i] for i in rng.integers(0, len(levels), count)]
    return [space.snap({name: columns[name][i] for name in columns}) for i in range(count)]


def _draw_uniform(space: SearchSpace, count: int, rng: np.random.Generator) -> list[Point]:
    return [space.from_unit(u) for u in rng.random((count, space.dim))]


def _draw_latin_hypercube(space: SearchSpace, count: int, rng: np.random.Generator) -> list[Point]:
    """One point in each of ``count`` equal slices of every axis, slices paired at random."""
    strata = np.stack([rng.permutation(count) for _ in range(space.dim)], axis=1)
    U = (strata + rng.random((count, space.dim))) / count
    return [space.from_unit(u) for u in U]


def _draw_scipy_latin_hypercube(space: SearchSpace, count: int, rng: np.random.Generator) -> list[Point]:
    """scipy's Latin hypercube (``scipy.stats.qmc.LatinHypercube``, random pairing of the
    strata), drawn from ``rng``. A design of its own beside ``lhs``, whose draws every recorded
    seed's trials depend on."""
    from scipy.stats import qmc

    return [space.from_unit(u) for u in qmc.LatinHypercube(d=space.dim, rng=rng).random(count)]


def _distinct_draws(space: SearchSpace, n: int, draw, rng: np.random.Generator) -> list[Point]:
    """Draw batches until ``n`` distinct points; in a finite space, fill the last few from the
    points not yet drawn rather than wait for a sampler to hit them by chance."""
    found: dict[tuple, Point] = {}
    stalled = 0
    while len(found) < n and stalled < _STALLED_BATCHES:
        before = len(found)
        for point in draw(n - len(found)):
            if len(found) < n:
                found.setdefault(space.key(point), point)
        stalled = stalled + 1 if len(found) == before else 0
        if stalled >= 3:
            for point in unlisted_points(space, found, n - len(found), rng):
                found[space.key(point)] = point
    return list(found.values())


def unlisted_points(space: SearchSpace, taken: Container[tuple], count: int, rng: np.random.Generator) -> list[Point]:
    """Up to ``count`` points of a finite space whose keys are not in ``taken``, in a seeded
    random order: where a sampler's draws stop finding new points, the space is nearly
    exhausted, so the rest is listed. Nothing for a space too large to list."""
    if space.cardinality is None or space.cardinality > _LISTABLE:
        return []
    rest = [p for p in space.all_points() if space.key(p) not in taken]
    return [rest[index] for index in rng.permutation(len(rest))[:count]]


def _grid_design(space: SearchSpace, n: int, seed: int) -> list[Point]:
    """The coarsest grid with at least ``n`` points, thinned to ``n`` by maximin spread."""
    levels = 2
    grid = grid_points(space, levels)
    most_levels = max(len(p.levels) if p.levels is not None else math.inf for p in space.tunable)
    # levels <= n bounds the loop when snapping merges a float's grid values.
    while len(grid) < n and levels < min(most_levels, n):
        levels += 1
        grid = grid_points(space, levels)
    return spread_subset(space, grid, n, seed=seed)


def _axis_values(param, count: int) -> list:
    if param.levels is not None and len(param.levels) <= count:
        return list(param.levels)
    units = [0.5] if count == 1 else np.linspace(0.0, 1.0, count)
    values: list = []
    for u in units:
        value = param.from_unit(u)
        if value not in values:
            values.append(value)
    return values


def _as_points(rows) -> list[Mapping[str, Any]]:
    """Points from a list of dicts or a DataFrame (e.g. a history), whose rows are points."""
    if hasattr(rows, "to_dict"):
        return rows.to_dict("records")
    return list(rows)
