"""The few names GPTune 2.0.0 imports from ytopt's ``autotune`` package.

GPTune does ``from autotune.problem import TuningProblem`` and ``from autotune.space import *``.
The ``autotune`` on PyPI is an unrelated project, so ``loratune.proposers.gptune`` registers
this module under those three names before it imports GPTune. Only the attributes GPTune reads
are provided.
"""

from __future__ import annotations

from typing import Any, Mapping

import skopt.space
from skopt.space import Categorical, Integer, Real

__all__ = ["TuningProblem", "Space", "Real", "Integer", "Categorical"]


class Space(skopt.space.Space):
    """skopt's space, plus the ``len()`` that GPTune's ``Problem.DI/DP/DO`` take, and
    indexing that returns the dimension itself (GPTune reads ``space[k].name``; skopt's own
    ``space[k]`` is an ``(index, dimension)`` pair)."""

    def __len__(self) -> int:
        return len(self.dimensions)

    def __getitem__(self, key: int | str) -> skopt.space.Dimension:
        if isinstance(key, str):
            for dimension in self.dimensions:
                if dimension.name == key:
                    return dimension
            raise KeyError(key)
        return self.dimensions[key]


class TuningProblem:
    """What GPTune's ``Problem`` copies: the task (input), parameter and output spaces, the
    objective callable, constraints, optional performance models and constants."""

    def __init__(
        self,
        input_space: Space,
        parameter_space: Space,
        output_space: Space,
        objective: Any = None,
        constraints: Mapping[str, Any] | None = None,
        models: Any = None,
        name: str = "loratune",
        constants: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.input_space = input_space
        self.parameter_space = parameter_space
        self.output_space = output_space
        self.objective = objective
        # GPTune iterates ``constraints.items()`` for every candidate of its search.
        self.constraints = dict(constraints or {})
        self.models = models
        self.constants = constants
