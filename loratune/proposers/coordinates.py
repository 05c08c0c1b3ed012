"""LoRA-aware search coordinates: the size of the adapter's update instead of the raw learning rate.

A LoRA update is B·A scaled by alpha / rank (alpha / sqrt(rank) with rsLoRA), and it moves with
the learning rate, so on measured LoRA grids the held-out loss runs along ridges of constant
lr · alpha / rank while rank on its own matters little. A model that sees
(log(lr · scale), log rank, log alpha) gets those ridges along one axis, where a GP with one
length scale per input can follow them; in the raw coordinates they are diagonals.

``LoraCoordinates`` maps a point to those coordinates and back (a decoded learning rate outside
its range is clipped by ``SearchSpace.snap``); any other tunable parameter keeps its unit
coordinate. The space needs ``learning_rate`` as a tunable float and ``lora_rank`` and
``lora_alpha`` as numbers (tunable, or fixed: a fixed one is part of the scale, not a coordinate).
``unit_features`` is the same map from the unit cube of ``SearchSpace`` to [0, 1] features,
differentiable in torch, for a model that searches the cube but sees the features (the
``botorch`` proposer's input transform).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from loratune.space import ChoiceParam, FixedParam, FloatParam, IntParam, SearchSpace

__all__ = ["COORDINATES", "UPDATE", "LoraCoordinates"]

# "raw": each parameter on its own (log) scale; "lora": alpha / rank; "rslora": alpha / sqrt(rank).
COORDINATES = ("raw", "lora", "rslora")
# The name of the update-size coordinate (lr times the LoRA scale), which replaces learning_rate.
UPDATE = "lora_update"
_RANK, _ALPHA, _LR = "lora_rank", "lora_alpha", "learning_rate"


class LoraCoordinates:
    """(log update, log rank, log alpha, other unit coordinates) of a point, and back."""

    def __init__(self, space: SearchSpace, kind: str) -> None:
        if kind not in COORDINATES[1:]:
            raise ValueError(f"coordinates: unknown {kind!r}; choose one of {list(COORDINATES)}")
        params = {p.name: p for p in space.params}
        where = f"proposer coordinates {kind}"
        if not isinstance(params.get(_LR), FloatParam) or _LR not in space.tunable_names:
            raise ValueError(f"{where}: needs {_LR} as a tunable float in search_space")
        for name in (_RANK, _ALPHA):
            if name not in params or not _positive_numbers(params[name]):
                raise ValueError(f"{where}: needs {name} in search_space with positive numeric values")
        self.space = space
        self.kind = kind
        self._params = params
        #: coordinate name -> (low, high) of a log-scaled float; "unit" ones are linear on [0, 1].
        self.bounds: dict[str, tuple[float, float]] = {}
        rank_range = _value_range(params[_RANK])
        alpha_range = _value_range(params[_ALPHA])
        lr = params[_LR]
        low_scale = self._scale(rank_range[1], alpha_range[0])
        high_scale = self._scale(rank_range[0], alpha_range[1])
        self.bounds[UPDATE] = (lr.low * low_scale, lr.high * high_scale)
        for name, value_range in ((_RANK, rank_range), (_ALPHA, alpha_range)):
            if name in space.tunable_names and value_range[0] < value_range[1]:
                self.bounds[name] = value_range
        self.others = [p for p in space.tunable if p.name not in (_RANK, _ALPHA, _LR)]
        #: The linear [0, 1] coordinates of the other tunable parameters.
        self.unit_names = [p.name for p in self.others]

    def _scale(self, rank: float, alpha: float) -> float:
        return alpha / (math.sqrt(rank) if self.kind == "rslora" else rank)

    def _value(self, point: Mapping[str, Any], name: str) -> float:
        param = self._params[name]
        return float(param.value if isinstance(param, FixedParam) else point[name])

    def encode(self, point: Mapping[str, Any]) -> dict[str, float]:
        """The point's coordinates (positive values for the log-scaled ones)."""
        rank, alpha = self._value(point, _RANK), self._value(point, _ALPHA)
        out = {UPDATE: float(point[_LR]) * self._scale(rank, alpha)}
        for name in (_RANK, _ALPHA):
            if name in self.bounds:
                out[name] = float(point[name])
        for param in self.others:
            out[param.name] = float(param.to_unit(point[param.name]))
        return out

    def decode(self, coordinates: Mapping[str, float]) -> dict[str, Any]:
        """The snapped point nearest the coordinates: rank and alpha first (on a log scale
        for a set of values), then the learning rate that gives the update with them."""
        point: dict[str, Any] = {}
        for name in (_RANK, _ALPHA):
            param = self._params[name]
            if name in self.bounds:
                point[name] = _nearest_on_log(param, float(coordinates[name]))
            elif not isinstance(param, FixedParam):
                point[name] = param.snap(_value_range(param)[0])
        for param in self.others:
            point[param.name] = param.from_unit(float(coordinates[param.name]))
        rank, alpha = self._value(point, _RANK), self._value(point, _ALPHA)
        point[_LR] = float(coordinates[UPDATE]) / self._scale(rank, alpha)
        return self.space.snap(point)

    def unit_features(self, U):
        """A torch tensor ``(..., dim)`` of unit-cube coordinates (``SearchSpace.to_unit``, the
        tunable parameters in order) as ``(..., dim)`` features in [0, 1]: the learning rate's
        column becomes log(lr · scale), rank's and alpha's their log values, each normalized to
        its range (``bounds``); any other column is kept. Differentiable in ``U``, so that an
        acquisition can be optimized in the cube through it."""
        import torch

        names = self.space.tunable_names
        logs = {
            name: _log_value(self._params[name], U[..., names.index(name)] if name in names else None)
            for name in (_RANK, _ALPHA, _LR)
        }
        rank_power = 0.5 if self.kind == "rslora" else 1.0  # as _scale
        columns = []
        for i, name in enumerate(names):
            if name == _LR:
                value = logs[_LR] + logs[_ALPHA] - rank_power * logs[_RANK]
            elif name in self.bounds:  # rank or alpha, tunable over a range
                value = logs[name]
            else:
                columns.append(U[..., i])
                continue
            low, high = (math.log(b) for b in self.bounds[UPDATE if name == _LR else name])
            columns.append((value - low) / (high - low))
        return torch.stack(columns, dim=-1)


def _log_value(param: Any, u):
    """log of a rank, alpha or learning rate at unit coordinate ``u`` (a tensor; None for a
    fixed parameter, whose log is a number), as ``SearchSpace`` decodes it but without snapping
    to a level: log-scaled numbers are affine in ``u``, linear ones the log of an affine map, a
    set of values the piecewise-linear interpolation of their logs over their ordinal positions."""
    import torch

    if isinstance(param, FixedParam):
        return math.log(float(param.value))
    u = u.clamp(0.0, 1.0)
    if isinstance(param, ChoiceParam):
        logs = torch.tensor([math.log(float(v)) for v in param.values], dtype=u.dtype)
        if len(logs) == 1:
            return logs[0].expand(u.shape)
        position = u * (len(logs) - 1)
        below = position.floor().clamp(0, len(logs) - 2).long()
        weight = position - below.to(u.dtype)
        return logs[below] * (1 - weight) + logs[below + 1] * weight
    low, high = float(param.low), float(param.high)
    if param.log:
        return math.log(low) + u * (math.log(high) - math.log(low))
    return torch.log(low + u * (high - low))


def _positive_numbers(param: Any) -> bool:
    if isinstance(param, FixedParam):
        values = [param.value]
    elif isinstance(param, ChoiceParam):
        values = list(param.values)
    elif isinstance(param, (IntParam, FloatParam)):
        values = [param.low, param.high]
    else:
        return False
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)


def _value_range(param: Any) -> tuple[float, float]:
    if isinstance(param, FixedParam):
        return float(param.value), float(param.value)
    if isinstance(param, ChoiceParam):
        return float(min(param.values)), float(max(param.values))
    return float(param.low), float(param.high)


def _nearest_on_log(param: Any, value: float) -> Any:
    """A choice's value nearest ``value`` in log distance (alpha 4..256 are powers of two);
    an integer or float parameter's own snap."""
    if isinstance(param, ChoiceParam):
        logs = np.log(np.asarray(param.values, dtype=float))
        return param.values[int(np.argmin(np.abs(logs - math.log(value))))]
    return param.snap(value)
