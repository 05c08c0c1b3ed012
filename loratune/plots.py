"""Plotly figures of a study: Pareto fronts, hypervolume curves, the Pareto set, the report.

Only drawing happens here; fronts and hypervolumes come from ``loratune.pareto``. Every HTML
file embeds plotly.js, so a report opens offline and survives ``snakemake --report``.
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
    "pareto_figure",
    "hypervolume_figure",
    "pareto_set_figure",
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
            f"{what}: needs {' or '.join(map(str, allowed))} objectives, "
            f"got {len(objectives)} ({list(objectives)})"
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


def _display_positions(
    trials: pd.DataFrame, objectives: Mapping[str, str]
) -> tuple[np.ndarray, np.ndarray]:
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


def pareto_figure(
    trials: pd.DataFrame, objectives: Mapping[str, str], space: SearchSpace
) -> go.Figure:
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
                    x=x, y=y, z=z, mode="markers",
                    marker=dict(symbol="diamond-open", size=9, color=colors[arm]), **style,
                )
            else:
                trace = go.Scatter(
                    x=front[names[0]], y=front[names[1]], mode="lines",
                    line=dict(shape=step_shape, color=colors[arm], width=2,
                              dash="dash" if arm == PILOT else "solid"),
                    **style,
                )
            fig.add_trace(trace, row=row, col=col)

    titles = [_axis_title(n, objectives[n]) for n in names]
    if three_d:
        fig.update_scenes(
            xaxis_title_text=titles[0], yaxis_title_text=titles[1], zaxis_title_text=titles[2]
        )
    else:
        fig.update_xaxes(title_text=titles[0])
        fig.update_yaxes(title_text=titles[1])
    if failed.all():
        fig.add_annotation(text="no trial succeeded", showarrow=False, xref="paper", yref="paper",
                           x=0.5, y=0.5)
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
        spread = (
            per_arm.groupby("n_trials")["hypervolume"]
            .agg(["median", "min", "max", "count"])
            .reset_index()
        )
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


def pareto_set_figure(
    trials: pd.DataFrame, objectives: Mapping[str, str], space: SearchSpace
) -> go.Figure:
    """The Pareto set as a table: per seed, the front of all arms together, then the front of
    pilot + each arm (``pareto.arm_fronts``); a row's ``found by`` names the arm whose trial it is.

    ``trials`` is the study's tidy table; a trial two arms both proposed counts once.
    """
    fronts = arm_fronts(trials, objectives)
    table = fronts[fronts["front"] != front_label(PILOT)].reset_index(drop=True)

    params = space.tunable_names
    headers = ["seed", "front", "trial id", "found by", "round", *params,
               *(_axis_title(n, objectives[n]) for n in objectives)]
    columns = [table["seed"], table["front"], table["trial_id"], table["arm"], table["round"],
               *(table[p] for p in params), *(table[n] for n in objectives)]
    cells = [[_format_value(v) for v in column.tolist()] for column in columns]
    fig = go.Figure(
        go.Table(
            header=dict(values=[f"<b>{html.escape(h)}</b>" for h in headers], align="left",
                        fill_color="#e8e8e8", height=30),
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


def report_html(title: str, sections: Sequence[tuple[str, go.Figure | str]]) -> str:
    """One self-contained page: a heading per section, then its figure or its text (a string
    is shown as a paragraph, escaped). plotly.js is embedded once, in the head."""
    body = []
    for index, (heading, content) in enumerate(sections):
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, go.Figure):
            body.append(
                content.to_html(
                    include_plotlyjs=False,
                    full_html=False,
                    div_id=f"section-{index}",
                    config=PLOTLY_CONFIG,
                )
            )
        elif isinstance(content, str):
            body.append(f"<p>{html.escape(content)}</p>")
        else:
            raise TypeError(
                f"report_html: section {heading!r} holds a {type(content).__name__}; "
                "expected a plotly Figure or text"
            )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;margin:2em auto;max-width:1400px}"
            "h2{margin-top:2em}</style>",
            f'<script type="text/javascript">{get_plotlyjs()}</script>',
            "</head>",
            "<body>",
            f"<h1>{html.escape(title)}</h1>",
            *body,
            "</body>",
            "</html>",
        ]
    )
