"""Plotly figures of a study and the report page that holds them.

Only drawing happens here: fronts and hypervolumes come from ``loratune.pareto``, every other
figure's data from ``loratune.report``, the importances from ``loratune.importance``. The
report embeds plotly.js once, so it opens offline and survives ``snakemake --report``; the
separate plots/*.html share one plots/plotly.min.js.
"""

from __future__ import annotations

import html
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from loratune.files import atomic_write_text
from loratune.ledger import ID_COLUMNS, PILOT, require_columns
from loratune.pareto import arm_fronts, arms_in_order, front_label, normalization_bounds, to_minimization
from loratune.space import SearchSpace

__all__ = [
    "Html",
    "pareto_figure",
    "hypervolume_figure",
    "hypervolume_cost_figure",
    "pareto_set_figure",
    "slice_figure",
    "contour_figure",
    "importance_figure",
    "learning_curves_figure",
    "timeline_figure",
    "summary_html",
    "rgba",
    "write_html",
    "report_html",
]

PILOT_COLOR = "#333333"
FAILED_COLOR = "#a6a6a6"
ARM_COLORS = qualitative.D3
SEEDS_PER_ROW = 3
# Long tracebacks would bury the rest of a hover box.
MAX_ERROR_CHARS = 160
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


def _arm_colors(arms: Sequence[str]) -> dict[str, str]:
    """Pilot dark grey, arms the D3 palette in order, so every figure agrees on colours."""
    colors = {PILOT: PILOT_COLOR}
    for arm in arms:
        if arm not in colors:
            colors[arm] = ARM_COLORS[(len(colors) - 1) % len(ARM_COLORS)]
    return colors


def _axis_title(name: str, sense: str) -> str:
    # "(min)" beside train_time would read as minutes.
    return f"{name} ({'minimized' if sense == 'min' else 'maximized'})"


def _format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _check_objectives(objectives: Mapping[str, str], what: str, allowed: Sequence[int]) -> None:
    if len(objectives) not in allowed:
        raise ValueError(
            f"{what}: needs {' or '.join(map(str, allowed))} objectives, " f"got {len(objectives)} ({list(objectives)})"
        )


def _hover_text(row: Mapping[str, Any], objectives: Mapping[str, str], space: SearchSpace) -> str:
    lines = [
        f"<b>{html.escape(str(row['trial_id']))}</b>",
        html.escape(space.describe(row)),
        *(f"{name}: {_format_value(row[name])}" for name in objectives),
        f"arm {html.escape(str(row['arm']))}, round {row['round']}, seed {row['seed']}",
        f"status: {html.escape(str(row['status']))}",
    ]
    error = row.get("error")
    if isinstance(error, str) and error:
        short = error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 1] + "…"
        lines.append(f"error: {html.escape(short)}")
    return "<br>".join(lines)


def _display_positions(trials: pd.DataFrame, objectives: Mapping[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Where each trial is drawn, and which trials count as failed.

    A failed trial usually lacks some objective; it is drawn on the worst edge of what the
    ok trials reached in that objective, so failures show up without stretching the axes.
    """
    values = trials[list(objectives)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    failed = (trials["status"] != "ok").to_numpy() | ~np.isfinite(values).all(axis=1)
    if failed.all():
        return values, failed
    senses = list(objectives.values())
    _, worst_min = normalization_bounds(trials, objectives)
    worst = to_minimization(worst_min[None, :], senses)[0]  # negating twice restores units
    positions = np.where(np.isfinite(values), values, worst)
    return positions, failed


def _stack_failures(spots: np.ndarray, texts: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """One cross per distinct spot, its hover listing every failed trial drawn there.

    Trials that failed without any objective all land on the same corner; separate markers
    would hide all hovers but the top one.
    """
    unique, inverse = np.unique(spots, axis=0, return_inverse=True)
    stacked = []
    for index in range(len(unique)):
        members = texts[inverse.ravel() == index]
        heading = [f"<i>{len(members)} failed trials here</i>"] if len(members) > 1 else []
        stacked.append("<br><br>".join([*heading, *members]))
    return unique, stacked


def _grid(n_panels: int) -> tuple[int, int]:
    cols = min(n_panels, SEEDS_PER_ROW)
    return math.ceil(n_panels / cols), cols


def pareto_figure(trials: pd.DataFrame, objectives: Mapping[str, str], space: SearchSpace) -> go.Figure:
    """Every trial coloured by arm, with the Pareto fronts of the pilot and of pilot + each arm.

    ``trials`` is the study's tidy table (``ledger.collect_trials``). One panel per seed; two
    objectives give a 2-D scatter with the fronts as step lines, three a 3-D scatter with the
    front points ringed. Failed trials are grey crosses.
    """
    _check_objectives(objectives, "pareto_figure", (2, 3))
    require_columns(trials, [*ID_COLUMNS, "status", *objectives], "pareto_figure's trials table")
    three_d = len(objectives) == 3
    names = list(objectives)
    trials = trials.reset_index(drop=True)
    positions, failed = _display_positions(trials, objectives)
    hover = np.array([_hover_text(row, objectives, space) for row in trials.to_dict("records")])
    fronts = arm_fronts(trials, objectives)
    arms = arms_in_order(trials["arm"])
    colors = _arm_colors(arms)
    seeds = sorted(pd.unique(trials["seed"]))
    rows, cols = _grid(len(seeds))
    fig = make_subplots(
        rows=rows,
        cols=cols,
        specs=[[{"type": "scene" if three_d else "xy"}] * cols for _ in range(rows)],
        subplot_titles=[f"seed {s}" for s in seeds] if len(seeds) > 1 else None,
        shared_xaxes="all" if not three_d else False,
        shared_yaxes="all" if not three_d else False,
        horizontal_spacing=0.06,
        vertical_spacing=0.12,
    )
    # The first side of a step goes along the first objective when the front is sorted from
    # its best value (see pareto_front's order); from its worst, the step turns the other way.
    step_shape = "hv" if objectives[names[0]] == "min" else "vh"

    def scatter(mask: np.ndarray, **style) -> go.Scatter | go.Scatter3d:
        coordinates = dict(zip("xyz", positions[mask].T))
        trace = go.Scatter3d if three_d else go.Scatter
        return trace(**coordinates, hovertext=hover[mask], hoverinfo="text", **style)

    for panel, seed in enumerate(seeds):
        row, col = panel // cols + 1, panel % cols + 1
        in_seed = (trials["seed"] == seed).to_numpy()
        first = panel == 0
        for arm in arms:
            mask = in_seed & (trials["arm"] == arm).to_numpy() & ~failed
            fig.add_trace(
                scatter(
                    mask,
                    mode="markers",
                    name=arm,
                    legendgroup=arm,
                    showlegend=first,
                    marker=dict(color=colors[arm], size=5 if three_d else 8, opacity=0.85),
                ),
                row=row,
                col=col,
            )
        if (in_seed & failed).any():
            spots, texts = _stack_failures(positions[in_seed & failed], hover[in_seed & failed])
            trace = go.Scatter3d if three_d else go.Scatter
            fig.add_trace(
                trace(
                    **dict(zip("xyz", spots.T)),
                    hovertext=texts,
                    hoverinfo="text",
                    mode="markers",
                    name="failed",
                    legendgroup="failed",
                    showlegend=first,
                    marker=dict(color=FAILED_COLOR, symbol="x", size=5 if three_d else 9),
                ),
                row=row,
                col=col,
            )
        for arm in arms:
            front = fronts[(fronts["seed"] == seed) & (fronts["front"] == front_label(arm))]
            label = f"front: {front_label(arm)}"
            style = dict(name=label, legendgroup=label, showlegend=first, hoverinfo="skip")
            if three_d:
                x, y, z = (front[n].to_numpy(dtype=float) for n in names)
                trace = go.Scatter3d(
                    x=x,
                    y=y,
                    z=z,
                    mode="markers",
                    marker=dict(symbol="diamond-open", size=9, color=colors[arm]),
                    **style,
                )
            else:
                trace = go.Scatter(
                    x=front[names[0]],
                    y=front[names[1]],
                    mode="lines",
                    line=dict(shape=step_shape, color=colors[arm], width=2, dash="dash" if arm == PILOT else "solid"),
                    **style,
                )
            fig.add_trace(trace, row=row, col=col)

    titles = [_axis_title(n, objectives[n]) for n in names]
    if three_d:
        fig.update_scenes(xaxis_title_text=titles[0], yaxis_title_text=titles[1], zaxis_title_text=titles[2])
    else:
        fig.update_xaxes(title_text=titles[0])
        fig.update_yaxes(title_text=titles[1])
    if failed.all():
        fig.add_annotation(text="no trial succeeded", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_layout(
        title="Trials and Pareto fronts",
        hovermode="closest",
        legend_title_text="arm",
        height=(600 if three_d else 460) * rows,
        template="plotly_white",
    )
    return fig


def rgba(color: str, alpha: float) -> str:
    """A "#rrggbb" colour at opacity ``alpha``: the bands of hypervolume figures (here and in bench/)."""
    red, green, blue = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red}, {green}, {blue}, {alpha})"


def hypervolume_figure(curves: pd.DataFrame) -> go.Figure:
    """Hypervolume against the number of trials per arm: the median over seeds as a line, the
    range over seeds as a band, and the pilot's last point marked (where the arms take over;
    their curves are drawn from there).

    ``curves`` is ``pareto.hypervolume_curves``'s table (arm, seed, n_trials, hypervolume).
    """
    require_columns(curves, ["arm", "seed", "n_trials", "hypervolume"], "hypervolume_figure's curves table")
    if curves.empty:
        raise ValueError("hypervolume_figure: no hypervolume values to draw")
    arms = arms_in_order(curves["arm"])
    colors = _arm_colors(arms)
    pilot = curves[curves["arm"] == PILOT]
    # Every arm's curve repeats the pilot's up to its end; drawn from there on, the arms
    # separate visibly from the shared start.
    pilot_end = pilot["n_trials"].max() if len(pilot) else 0
    fig = go.Figure()
    for arm in arms:
        per_arm = curves[curves["arm"] == arm]
        if arm != PILOT:
            per_arm = per_arm[per_arm["n_trials"] >= pilot_end]
        if per_arm.empty:
            continue
        spread = per_arm.groupby("n_trials")["hypervolume"].agg(["median", "min", "max", "count"]).reset_index()
        color = colors[arm]
        n = spread["n_trials"].to_numpy()
        fig.add_trace(
            go.Scatter(
                x=np.concatenate([n, n[::-1]]),
                y=np.concatenate([spread["max"], spread["min"][::-1]]),
                fill="toself",
                fillcolor=rgba(color, 0.18),
                mode="lines",
                line=dict(width=0),
                hoverinfo="skip",
                legendgroup=arm,
                showlegend=False,
                name=f"{arm} range",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=n,
                y=spread["median"],
                mode="lines",
                name=arm,
                legendgroup=arm,
                line=dict(color=color, width=2, dash="dash" if arm == PILOT else "solid"),
                customdata=spread[["min", "max", "count"]].to_numpy(),
                hovertemplate=(
                    f"{html.escape(arm)}: %{{x}} trials<br>median %{{y:.4g}}"
                    "<br>range %{customdata[0]:.4g} – %{customdata[1]:.4g}"
                    " over %{customdata[2]} seed(s)<extra></extra>"
                ),
            )
        )
        if arm == PILOT:
            last = spread.iloc[-1]
            fig.add_trace(
                go.Scatter(
                    x=[last["n_trials"]],
                    y=[last["median"]],
                    mode="markers+text",
                    marker=dict(symbol="star", size=14, color=color),
                    text=["end of pilot"],
                    textposition="top left",
                    name="end of pilot",
                    hovertemplate="end of pilot: %{x} trials, median %{y:.4g}<extra></extra>",
                )
            )
    fig.update_layout(
        title="Hypervolume of the Pareto front (normalized objectives)",
        xaxis_title="trials evaluated (pilot, then the arm's rounds)",
        yaxis_title="hypervolume (median and range over seeds)",
        hovermode="closest",
        template="plotly_white",
    )
    return fig


def pareto_set_figure(trials: pd.DataFrame, objectives: Mapping[str, str], space: SearchSpace) -> go.Figure:
    """The Pareto set as a table: per seed, the front of all arms together, then the front of
    pilot + each arm (``pareto.arm_fronts``); a row's ``found by`` names the arm whose trial it is.

    ``trials`` is the study's tidy table; a trial two arms both proposed counts once.
    """
    fronts = arm_fronts(trials, objectives)
    table = fronts[fronts["front"] != front_label(PILOT)].reset_index(drop=True)

    params = space.tunable_names
    headers = [
        "seed",
        "front",
        "trial id",
        "found by",
        "round",
        *params,
        *(_axis_title(n, objectives[n]) for n in objectives),
    ]
    columns = [
        table["seed"],
        table["front"],
        table["trial_id"],
        table["arm"],
        table["round"],
        *(table[p] for p in params),
        *(table[n] for n in objectives),
    ]
    cells = [[_format_value(v) for v in column.tolist()] for column in columns]
    fig = go.Figure(
        go.Table(
            header=dict(
                values=[f"<b>{html.escape(h)}</b>" for h in headers], align="left", fill_color="#e8e8e8", height=30
            ),
            cells=dict(values=cells, align="left", height=26),
            # Relative widths: trial ids are the longest entries.
            columnwidth=[0.5, 1.3, 2.0, 0.9, 0.6, *[1.0] * len(params), *[1.2] * len(objectives)],
        )
    )
    fig.update_layout(
        title="Pareto set",
        height=min(1200, 160 + 26 * max(len(table), 1)),
        margin=dict(l=20, r=20, t=60, b=20),
    )
    return fig


def hypervolume_cost_figure(cost_curves: pd.DataFrame, cost: str) -> go.Figure:
    """Hypervolume against cumulative training cost: one step line per arm and seed, from
    ``report.hypervolume_cost_curves``, so arms with and without early stopping compare at equal
    cost (a stopped trial costs what it trained)."""
    fig = go.Figure()
    colors = _arm_colors(arms_in_order(cost_curves["arm"]))
    seen = set()
    for (arm, seed), rows in cost_curves.groupby(["arm", "seed"], sort=False):
        fig.add_trace(
            go.Scatter(
                x=rows[cost],
                y=rows["hypervolume"],
                mode="lines+markers",
                name=arm,
                legendgroup=arm,
                showlegend=arm not in seen,
                line=dict(shape="hv", color=colors[arm], width=2, dash="dash" if arm == PILOT else "solid"),
                marker=dict(size=4),
                customdata=rows[["n_trials"]].to_numpy(),
                hovertemplate=(
                    f"{html.escape(str(arm))}, seed {seed}<br>%{{x:.4g}} {cost}"
                    "<br>%{customdata[0]} trials, hypervolume %{y:.4g}<extra></extra>"
                ),
            )
        )
        seen.add(arm)
    if cost_curves.empty:
        fig.add_annotation(text=f"no trial recorded {cost}", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    label = "training seconds" if cost == "train_seconds" else "training steps"
    fig.update_layout(
        title=f"Hypervolume against cumulative {label} (every trial, stopped and failed included)",
        xaxis_title=f"cumulative {label} (pilot, then the arm's trials)",
        yaxis_title="hypervolume (normalized objectives)",
        hovermode="closest",
        template="plotly_white",
    )
    return fig


# Diverged trials reach losses many times the best ones; axes and colours stop at this quantile
# of the values (a double click on a plotly figure shows everything).
ROBUST_QUANTILE = 0.9
PERCENTILE = f"{ROBUST_QUANTILE * 100:.0f}th"


def _robust_range(values) -> tuple[list[float] | None, bool]:
    """An axis range over ``values`` with margins, and whether it stops at ``ROBUST_QUANTILE``
    of them (when the largest values are far out); (None, False) for fewer than two values."""
    values = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None, False
    low, high, top = values.min(), np.quantile(values, ROBUST_QUANTILE), values.max()
    span = max(high - low, 1e-12)
    if len(values) < 5 or top - low <= 1.5 * span:
        span = max(top - low, 1e-12)
        return [low - 0.05 * span, top + 0.05 * span], False
    return [low - 0.05 * span, high + 0.25 * span], True


def _log_axis(param) -> bool:
    """Draw a parameter on a log axis: a log-scaled one, or numeric choices spanning a decade."""
    if getattr(param, "log", False):
        return True
    values = getattr(param, "values", None)
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
        return max(values) / min(values) >= 10
    return False


def slice_figure(slices: pd.DataFrame, objectives: Mapping[str, str], space: SearchSpace) -> go.Figure:
    """Each objective (rows) against each tuned parameter (columns), trials coloured by arm;
    a stopped trial is an open circle (its value was measured after fewer steps). ``slices`` is
    ``report.slice_data``'s table."""
    names, params = list(objectives), space.tunable_names
    fig = make_subplots(
        rows=len(names),
        cols=len(params),
        shared_yaxes=True,
        shared_xaxes=True,
        horizontal_spacing=0.03,
        vertical_spacing=0.06,
    )
    colors = _arm_colors(arms_in_order(slices["arm"]) if len(slices) else [])
    seen = set()
    for row, objective in enumerate(names, start=1):
        for col, name in enumerate(params, start=1):
            cell = slices[(slices["objective"] == objective) & (slices["parameter"] == name)]
            for arm, per_arm in cell.groupby("arm", sort=False):
                stopped = (per_arm["status"] != "ok").to_numpy()
                fig.add_trace(
                    go.Scatter(
                        x=per_arm["value"],
                        y=per_arm["objective_value"],
                        mode="markers",
                        name=arm,
                        legendgroup=arm,
                        showlegend=arm not in seen,
                        marker=dict(
                            color=colors[arm], size=7, opacity=0.8, symbol=np.where(stopped, "circle-open", "circle")
                        ),
                        text=[
                            f"{html.escape(str(t))}<br>seed {s}, {html.escape(str(st))}"
                            for t, s, st in zip(per_arm["trial_id"], per_arm["seed"], per_arm["status"])
                        ],
                        hovertemplate=f"%{{text}}<br>{name} %{{x}}<br>{objective} %{{y:.5g}}<extra></extra>",
                    ),
                    row=row,
                    col=col,
                )
                seen.add(arm)
            if row == len(names):
                fig.update_xaxes(title_text=name, type="log" if _log_axis(space[name]) else None, row=row, col=col)
            else:
                fig.update_xaxes(type="log" if _log_axis(space[name]) else None, row=row, col=col)
        values = slices.loc[slices["objective"] == objective, "objective_value"]
        fig.update_yaxes(
            title_text=_axis_title(objective, objectives[objective]), range=_robust_range(values)[0], row=row, col=1
        )
    fig.update_layout(
        title="Each objective against each parameter (open circles: stopped early; "
        f"axes stop at the {PERCENTILE} percentile, double-click to see all)",
        height=320 * len(names) + 80,
        template="plotly_white",
        legend_title_text="arm",
    )
    return fig


def contour_figure(contour: Mapping[str, Any] | None, objective: str) -> go.Figure:
    """``objective`` over log10(learning rate) x log2(alpha / rank) from ``report.contour_data``,
    the trials as dots and dotted lines of equal lr * alpha / rank (the update's size)."""
    fig = go.Figure()
    if contour is None:
        fig.add_annotation(
            text="needs learning_rate, lora_alpha and lora_rank and three ok trials",
            showarrow=False,
            xref="paper",
            yref="paper",
            x=0.5,
            y=0.5,
        )
        fig.update_layout(title=f"{objective} over learning rate and alpha / rank", template="plotly_white")
        return fig
    x, y = contour["x"], contour["y"]
    colour_range, capped = _robust_range(contour["points"]["value"])
    colours = dict(zmin=float(np.nanmin(contour["z"])), zmax=colour_range[1]) if capped else {}
    fig.add_trace(
        go.Contour(
            x=x,
            y=y,
            z=contour["z"],
            colorscale="Viridis",
            ncontours=24,
            **colours,
            colorbar=dict(title=dict(text=objective)),
            connectgaps=False,
            hovertemplate=f"log10 lr %{{x:.2f}}<br>log2 α/r %{{y:.2f}}<br>{objective} %{{z:.4g}}"
            "<extra>interpolated</extra>",
        )
    )
    points = contour["points"]
    fig.add_trace(
        go.Scatter(
            x=points["x"],
            y=points["y"],
            mode="markers",
            name="trials",
            marker=dict(color="white", size=7, line=dict(color="black", width=1)),
            text=[
                f"{html.escape(str(t))} (seed {s}, {html.escape(str(a))})"
                for t, s, a in zip(points["trial_id"], points["seed"], points["arm"])
            ],
            customdata=points[["value"]].to_numpy(),
            hovertemplate=f"%{{text}}<br>{objective} %{{customdata[0]:.5g}}<extra></extra>",
        )
    )
    # log10(lr * alpha / rank) = x + y * log10(2): constant along lines of slope -1 / log10(2).
    scale = x[None, :] + y[:, None] * math.log10(2)
    for level in range(math.ceil(scale.min()), math.floor(scale.max()) + 1):
        line_y = (level - x) / math.log10(2)
        inside = (line_y >= y.min()) & (line_y <= y.max())
        fig.add_trace(
            go.Scatter(
                x=x[inside],
                y=line_y[inside],
                mode="lines",
                showlegend=False,
                line=dict(color="rgba(255,255,255,0.6)", dash="dot", width=1),
                hovertemplate=f"lr·α/r = 1e{level}<extra></extra>",
            )
        )
    fig.update_layout(
        title=f"{objective} over learning rate × alpha / rank (dotted: equal lr·α/r"
        + (f"; colours stop at the {PERCENTILE} percentile)" if capped else ")"),
        xaxis_title="log10 learning rate",
        yaxis_title="log2(alpha / rank)",
        template="plotly_white",
        height=560,
        showlegend=False,
    )
    return fig


def importance_figure(importance: pd.DataFrame) -> go.Figure:
    """Per objective, the fANOVA importance of each tuned parameter (``importance.tsv``) and,
    beside it, the shares of the fit that adds log(lr·α/r)."""
    objectives = list(pd.unique(importance["objective"]))
    fig = make_subplots(
        rows=1, cols=max(len(objectives), 1), subplot_titles=objectives, shared_yaxes=False, horizontal_spacing=0.12
    )
    with_scale = importance["importance_with_update_scale"].notna().any()
    for col, objective in enumerate(objectives, start=1):
        rows = importance[importance["objective"] == objective]
        rows = rows.assign(order=rows["importance"].fillna(-1)).sort_values("order")
        fig.add_trace(
            go.Bar(
                x=rows["importance"],
                y=rows["parameter"],
                orientation="h",
                name="tuned parameters",
                legendgroup="plain",
                showlegend=col == 1,
                marker_color=ARM_COLORS[0],
                customdata=rows[["n_trials"]].to_numpy(),
                hovertemplate="%{y}: %{x:.3f} (%{customdata[0]} trials)<extra></extra>",
            ),
            row=1,
            col=col,
        )
        if with_scale:
            fig.add_trace(
                go.Bar(
                    x=rows["importance_with_update_scale"],
                    y=rows["parameter"],
                    orientation="h",
                    name="with log(lr·α/r) added",
                    legendgroup="scale",
                    showlegend=col == 1,
                    marker_color=ARM_COLORS[1],
                    hovertemplate="%{y}: %{x:.3f} with the update scale<extra></extra>",
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="fANOVA importance (share of variance)", range=[0, 1], row=1, col=col)
    if not objectives or importance["importance"].isna().all():
        fig.add_annotation(
            text="too few ok trials to estimate importance", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5
        )
    fig.update_layout(
        title="Hyperparameter importance (fANOVA over the ok trials)",
        barmode="group",
        template="plotly_white",
        height=140 + 60 * importance["parameter"].nunique(),
    )
    return fig


def learning_curves_figure(curves: pd.DataFrame) -> go.Figure:
    """Held-out and training loss against step of every trial with a recorded curve
    (``report.learning_curve_data``): coloured by arm, Pareto-set trials drawn bold, stopped
    trials dotted, failed ones grey."""
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=["held-out loss (eval_loss)", "training loss"], horizontal_spacing=0.08
    )
    colors = _arm_colors(arms_in_order(curves["arm"]) if len(curves) else [])
    seen = set()
    order = {arm: index for index, arm in enumerate(colors)}
    ordered = curves.sort_values("arm", key=lambda arms: arms.map(order), kind="stable") if len(curves) else curves
    for (seed, trial_id), rows in ordered.groupby(["seed", "trial_id"], sort=False):
        arm, status, on_front = rows["arm"].iloc[0], rows["status"].iloc[0], bool(rows["on_front"].iloc[0])
        color = colors[arm] if status in ("ok", "stopped") else FAILED_COLOR
        style = dict(color=color, width=3 if on_front else 1, dash="dot" if status == "stopped" else "solid")
        label = f"{html.escape(str(trial_id))} (seed {seed}, {html.escape(str(arm))}, {html.escape(str(status))}"
        label += ", Pareto set)" if on_front else ")"
        for col, metric in enumerate(["eval_loss", "train_loss"], start=1):
            fig.add_trace(
                go.Scatter(
                    x=rows["step"],
                    y=rows[metric],
                    mode="lines+markers",
                    name=arm,
                    legendgroup=arm,
                    showlegend=col == 1 and arm not in seen,
                    line=style,
                    marker=dict(size=4, color=color),
                    opacity=0.95 if on_front else 0.55,
                    hovertemplate=f"{label}<br>step %{{x}}: {metric} %{{y:.4f}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        seen.add(arm)
    if curves.empty:
        fig.add_annotation(
            text="no trial recorded a learning curve", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5
        )
    fig.update_xaxes(title_text="step")
    for col, metric in enumerate(["eval_loss", "train_loss"], start=1):
        fig.update_yaxes(range=_robust_range(curves[metric])[0], row=1, col=col)
    fig.update_yaxes(title_text="loss", col=1)
    fig.update_layout(
        title="Learning curves (bold: Pareto set; dotted: stopped early; "
        f"axes stop at the {PERCENTILE} percentile, double-click to see all)",
        template="plotly_white",
        height=480,
        legend_title_text="arm",
        hovermode="closest",
    )
    return fig


# started_at/finished_at are recorded to the second: a shorter trial is drawn one second wide.
MIN_BAR_MS = 1000


def timeline_figure(timeline: pd.DataFrame) -> go.Figure:
    """One bar per trial from its start to its finish, on the lane of the device it ran on
    (``report.timeline_data``), coloured by arm; failed trials grey."""
    fig = go.Figure()
    colors = _arm_colors(arms_in_order(timeline["arm"]) if len(timeline) else [])
    for arm, rows in timeline.groupby("arm", sort=False):
        duration = (rows["finish"] - rows["start"]).dt.total_seconds()
        fig.add_trace(
            go.Bar(
                base=rows["start"].map(lambda t: t.isoformat()),
                x=np.maximum(duration * 1000, MIN_BAR_MS),
                y=rows["lane"],
                orientation="h",
                name=arm,
                marker_color=[colors[arm] if s != "failed" else FAILED_COLOR for s in rows["status"]],
                text=rows["trial_id"],
                textposition="inside",
                insidetextanchor="start",
                customdata=np.stack([duration, rows["status"], rows["seed"]], axis=1),
                hovertemplate=(
                    "%{text}<br>seed %{customdata[2]}, %{customdata[1]}<br>%{base} + %{customdata[0]:.0f} s"
                    "<extra>%{y}</extra>"
                ),
            )
        )
    if timeline.empty:
        fig.add_annotation(
            text="no trial recorded started_at and finished_at",
            showarrow=False,
            xref="paper",
            yref="paper",
            x=0.5,
            y=0.5,
        )
    lanes = timeline["lane"].nunique() if len(timeline) else 1
    fig.update_xaxes(type="date", title_text="time (UTC)")
    fig.update_yaxes(autorange="reversed", title_text="device")
    fig.update_layout(
        title="Trials per device over time",
        barmode="overlay",
        template="plotly_white",
        height=max(300, 160 + 34 * lanes),
        legend_title_text="arm",
    )
    return fig


class Html(str):
    """Markup the report inserts as it is (built here, with every value escaped)."""


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], marked: Sequence[bool] = ()) -> str:
    """A plain HTML table; ``headers`` are escaped, cells must already be markup."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for index, row in enumerate(rows):
        style = ' class="knee"' if index < len(marked) and marked[index] else ""
        body.append(f"<tr{style}>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def summary_html(
    facts: Sequence[tuple[str, str]],
    recommended: pd.DataFrame,
    objectives: Mapping[str, str],
    space: SearchSpace,
) -> Html:
    """The top of the report: the study's facts (label, value) and the recommended trials
    (``report.recommended_trials`` with an ``adapter`` column: a path, or empty where no
    adapter was kept), the knee point of each seed marked."""
    parts = ['<dl class="facts">']
    for label, value in facts:
        parts.append(f"<dt>{html.escape(label)}</dt><dd>{html.escape(value)}</dd>")
    parts.append("</dl>")
    parts.append("<h2>Recommended trials</h2>")
    if recommended.empty:
        parts.append("<p>No trial succeeded: nothing to recommend.</p>")
        return Html("".join(parts))
    parts.append(
        "<p>The Pareto set of each seed (no other trial is at least as good in every objective). "
        "<b>★ knee</b>: the point closest to the ideal one once every objective is scaled from its best (0) "
        "to its worst (1) value over the Pareto set: the balanced choice.</p>"
    )
    params = space.tunable_names
    headers = [
        "",
        "seed",
        "trial id",
        "found by",
        *params,
        *(_axis_title(n, s) for n, s in objectives.items()),
        "distance to ideal",
        "adapter",
    ]
    rows = []
    for record in recommended.to_dict("records"):
        adapter = record.get("adapter")
        rows.append(
            [
                "★ knee" if record["knee"] else "",
                html.escape(_format_value(record["seed"])),
                f"<code>{html.escape(str(record['trial_id']))}</code>",
                html.escape(str(record["arm"])),
                *(html.escape(_format_value(record[p])) for p in params),
                *(html.escape(_format_value(record[n])) for n in objectives),
                f"{record['distance']:.3f}",
                f"<code>{html.escape(adapter)}</code>" if isinstance(adapter, str) and adapter else "not kept",
            ]
        )
    parts.append(_html_table(headers, rows, list(recommended["knee"])))
    return Html("".join(parts))


def _div_id(name: str) -> str:
    # A fixed element id keeps the HTML byte-identical between runs (plotly's default is random).
    return re.sub(r"[^A-Za-z0-9_-]", "-", name) or "figure"


PLOTLY_JS = "plotly.min.js"


def write_html(fig: go.Figure, path: str | os.PathLike) -> None:
    """An HTML page of ``fig``, written atomically, that loads plotly.js from ``plotly.min.js``
    beside it (written once per folder: a study's plots share one 4.6 MB copy instead of
    embedding one each); it works offline. The report (``report_html``) embeds its own."""
    library = Path(path).parent / PLOTLY_JS
    script = get_plotlyjs()
    if not library.is_file() or library.read_text(encoding="utf-8") != script:
        atomic_write_text(library, script)
    page = fig.to_html(
        include_plotlyjs="directory",
        full_html=True,
        div_id=_div_id(os.path.splitext(os.path.basename(path))[0]),
        config=PLOTLY_CONFIG,
    )
    atomic_write_text(path, page)


REPORT_STYLE = (
    "body{font-family:sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}"
    "h2{margin-top:2em;border-bottom:1px solid #ddd}"
    "dl.facts{display:grid;grid-template-columns:max-content auto;gap:.3em 1.5em}"
    "dl.facts dt{font-weight:bold}dl.facts dd{margin:0}"
    "table{border-collapse:collapse;font-size:.9em}th,td{padding:.3em .6em;border-bottom:1px solid #e4e4e4;"
    "text-align:left}th{background:#f0f0f0}tr.knee{background:#fff3c4;font-weight:bold}"
    "nav{margin:1.5em 0;line-height:1.8}nav a{margin-right:1em}"
)


def report_html(title: str, sections: Sequence[tuple[str, go.Figure | Html | str]], intro: Html | None = None) -> str:
    """One self-contained page: ``intro`` (markup) under the title, a table of contents, then a
    heading per section and its figure, its markup (``Html``) or its text (any other string is
    shown as a paragraph, escaped). plotly.js is embedded once, in the head."""
    body, links = [], []
    for index, (heading, content) in enumerate(sections):
        anchor = f"section-{index}"
        links.append(f'<a href="#{anchor}-heading">{html.escape(heading)}</a>')
        body.append(f'<h2 id="{anchor}-heading">{html.escape(heading)}</h2>')
        if isinstance(content, go.Figure):
            body.append(
                content.to_html(
                    include_plotlyjs=False,
                    full_html=False,
                    div_id=anchor,
                    config=PLOTLY_CONFIG,
                )
            )
        elif isinstance(content, Html):
            body.append(f'<div id="{anchor}">{content}</div>')
        elif isinstance(content, str):
            body.append(f"<p>{html.escape(content)}</p>")
        else:
            raise TypeError(
                f"report_html: section {heading!r} holds a {type(content).__name__}; "
                "expected a plotly Figure, Html or text"
            )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{REPORT_STYLE}</style>",
            f'<script type="text/javascript">{get_plotlyjs()}</script>',
            "</head>",
            "<body>",
            f"<h1>{html.escape(title)}</h1>",
            *([str(intro)] if intro is not None else []),
            f"<nav>{''.join(links)}</nav>" if links else "",
            *body,
            "</body>",
            "</html>",
        ]
    )
