"""The benchmark problems the search-efficiency benches run: a problem of
``loratune.benchmarks`` with the objectives, noise and search space it is run with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from loratune.benchmarks import (
    CurveTable,
    LoraSurrogate,
    LoraTable,
    TabulatedTrialFailed,
    evaluate,
    get_problem,
    true_front,
)
from loratune.designs import pilot_design
from loratune.pareto import non_dominated, to_minimization
from loratune.space import SearchSpace

# The study's search space (config/experiments): rank on a step of 4, alpha from powers of
# two, the learning rate on a log scale.
SPACE = {
    "lora_rank": {"type": "int", "low": 4, "high": 256, "step": 4},
    "lora_alpha": {"type": "choice", "values": [4, 8, 16, 32, 64, 128, 256]},
    "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
}


@dataclass(frozen=True)
class BenchProblem:
    """A problem of ``loratune.benchmarks`` with the objectives and noise it is run with."""

    name: str
    problem: str | CurveTable
    objectives: Mapping[str, str]
    noise: float = 0.0
    about: str = ""
    # The search space, when not the study's (SPACE).
    space_config: Mapping[str, Any] | None = None

    @property
    def space(self) -> SearchSpace:
        return SearchSpace.from_config(self.space_config or SPACE)

    def skip_reason(self) -> str | None:
        spec = get_problem(self.problem)
        if isinstance(spec, LoraTable) and not spec.available():
            return f"no measured grid at {spec.path} (measure it on a GPU first)"
        if isinstance(spec, CurveTable) and not Path(spec.path).is_file():
            return f"no learning-curve table at {spec.path}"
        return None

    def runs(self, space: SearchSpace) -> np.ndarray | None:
        """Every measured run's noise-free values at the full budget inside the space, in
        minimization space (failed runs left out); None for an analytic problem. A curve
        table's run is its measured point answered as a study of seed 0 sees it."""
        spec = get_problem(self.problem)
        if isinstance(spec, LoraTable):
            rows, _ = spec.rows_in(space)
            if "status" in rows.columns:
                rows = rows[rows["status"].astype(str) == "ok"]
            Y = to_minimization(rows[list(self.objectives)].to_numpy(dtype=float), list(self.objectives.values()))
            return Y[np.isfinite(Y).all(axis=1)]
        if isinstance(spec, CurveTable):
            points, _ = spec.points(space)
            return self._values(space, [space.snap(p) for p in points.to_dict("records")])
        if isinstance(spec, LoraSurrogate):
            return self._values(space, pilot_design(space, SURROGATE_RUNS, "random", 0))
        return None

    def _values(self, space: SearchSpace, points: list[dict]) -> np.ndarray:
        values = [self.observe(space, point, 0)[1] for point in points]
        return np.array([v for v in values if v is not None])

    def front(self, space: SearchSpace) -> np.ndarray:
        """Points of the true Pareto front, in minimization space."""
        spec = get_problem(self.problem)
        if isinstance(spec, LoraTable):
            return spec.true_front(space, self.objectives)
        if isinstance(spec, CurveTable):
            Y = self.runs(space)
            return Y[non_dominated(Y)]
        if isinstance(spec, LoraSurrogate):
            # Its loss is lowest where lr * alpha / rank = 4e-4 (d = 0, loratune.benchmarks):
            # that ridge at every rank, with the random runs (for objectives off the ridge).
            rank = next(p for p in space.tunable if p.name == "lora_rank")
            ridge = [
                space.snap({"lora_rank": r, "lora_alpha": 16, "learning_rate": 4e-4 * r / 16})
                for r in range(int(rank.low), int(rank.high) + 1, int(rank.step or 1))
            ]
            Y = np.vstack([self.runs(space), self._values(space, ridge)])
            return Y[non_dominated(Y)]
        m = len(self.objectives)
        return true_front(self.problem, m, 2001 if m == 2 else 5000)

    def observe(self, space: SearchSpace, point: dict, seed: int) -> tuple[dict | None, np.ndarray | None]:
        """(what the proposer sees, the noise-free values in minimization space); both None
        for a failed trial."""
        try:
            observed = evaluate(self.problem, space, point, self.objectives, seed=seed, noise=self.noise)
        except TabulatedTrialFailed:
            return None, None
        if observed.get("status") == "failed":  # a measured run that diverged
            return None, None
        truth = observed if self.noise == 0 else evaluate(self.problem, space, point, self.objectives)
        values = [truth[name] for name in self.objectives]
        return {name: observed[name] for name in self.objectives}, to_minimization(
            [values], list(self.objectives.values())
        )[0]


TWO = {"f1": "min", "f2": "min"}
# The random points whose values stand for the LoRA surrogate's "runs" (its scale's median).
SURROGATE_RUNS = 4000
# The two measured learning-curve tables (bench/data/README.md), with the objectives the
# warm-start and coordinate benches run them with: held-out loss against adapter size.
DATA = Path(__file__).resolve().parents[1] / "data"
TABLE_OBJECTIVES = {"eval_loss": "min", "trainable_params": "min"}
CURVE_TABLES = {
    "table_self_instruct": CurveTable(str(DATA / "curves_self_instruct.jsonl")),
    "table_instructions": CurveTable(str(DATA / "curves_instructions.jsonl")),
}
# The second model's table, the same design on the self-instruct tasks (bench/data/README.md): with
# table_self_instruct, the pair across models of bench/warm_start.py --pair.
CROSS_MODEL_TABLES = {
    "table_gemma_self_instruct": CurveTable(str(DATA / "curves_gemma_self_instruct.jsonl")),
}
TABLE_MODELS = {
    "table_self_instruct": "SmolLM2-135M",
    "table_instructions": "SmolLM2-135M",
    "table_gemma_self_instruct": "Gemma 3 270M",
}
ALL_CURVE_TABLES = {**CURVE_TABLES, **CROSS_MODEL_TABLES}
BENCH_PROBLEMS = {
    p.name: p
    for p in (
        BenchProblem("zdt1", "zdt1", TWO, about="ZDT1, convex front; f1 = rank, distance in alpha and lr"),
        BenchProblem("zdt2", "zdt2", TWO, about="ZDT2, concave front"),
        BenchProblem(
            "dtlz2", "dtlz2", TWO, about="DTLZ2, 2 objectives: a quarter-circle front in the middle of alpha and lr"
        ),
        BenchProblem(
            "zdt1_noisy", "zdt1", TWO, noise=0.1, about="ZDT1 observed with N(0, 0.1^2) noise, scored noise-free"
        ),
        BenchProblem(
            "lora_table",
            "lora_table",
            {"eval_loss": "min", "train_time": "min"},
            about="measured SmolLM2-135M runs (bench/data/lora_grid.tsv, 4 x 4 x 4), answered by the nearest "
            "grid point: a proposal between grid levels repeats a measured run",
        ),
        BenchProblem(
            "lora_table_grid",
            "lora_table",
            {"eval_loss": "min", "train_time": "min"},
            about="the same measured runs, searched over the grid's own levels only (64 points), so that no "
            "trial repeats a measured run",
            space_config={
                "lora_rank": {"type": "choice", "values": [4, 16, 64, 256]},
                "lora_alpha": {"type": "choice", "values": [4, 16, 64, 256]},
                "learning_rate": {"type": "choice", "values": [1e-5, 1e-4, 1e-3, 1e-2]},
            },
        ),
        BenchProblem(
            "lora_surrogate",
            "lora_surrogate",
            TABLE_OBJECTIVES,
            about="the LoRA surrogate (loratune.benchmarks.LoraSurrogate, noise-free): eval loss U-shaped in "
            "log(lr * alpha / rank), against trainable parameters; scaled as a table, its runs 4000 random points",
        ),
        *(
            BenchProblem(
                name,
                table,
                TABLE_OBJECTIVES,
                about=f"measured {TABLE_MODELS[name]} learning curves ({Path(table.path).name}, 128 runs), the best "
                "held-out loss of the nearest measured run against its trainable parameters",
            )
            for name, table in ALL_CURVE_TABLES.items()
        ),
    )
}
