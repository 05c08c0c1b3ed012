"""Plotly figures of a study, built from tables made the way the workflow makes them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from loratune import ledger, plots, report
from loratune.loop import trial_curves
from loratune.pareto import hypervolume_curves, pareto_front, to_minimization
from loratune.space import SearchSpace
from test_ledger import OBJECTIVES, make_study

THREE_OBJECTIVES = {"train_loss": "min", "train_time": "min", "eval_accuracy": "max"}
# Maximizing the first objective turns the steps the other way round.
MIXED_SENSES = {"eval_accuracy": "max", "train_time": "min"}


def study_trials(root, objectives=OBJECTIVES, seeds=(0,), arms=("gptune", "random")):
    space, finals = make_study(root, seeds=seeds, arms=arms, objectives=objectives, pilot_n=8,
                               rounds=2, batch=3)
    return space, ledger.collect_trials(ledger.read_table(p) for p in finals)


def traces(fig: go.Figure, name: str) -> list:
    return [t for t in fig.data if t.name == name]


@pytest.fixture(scope="module")
def one_seed(tmp_path_factory):
    return study_trials(tmp_path_factory.mktemp("one_seed"))


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    return study_trials(tmp_path_factory.mktemp("two_seeds"), seeds=(0, 1))


def test_pareto_figure_draws_every_trial_once_with_its_hover(one_seed):
    space, trials = one_seed
    fig = plots.pareto_figure(trials, OBJECTIVES, space)

    markers = [t for t in fig.data if t.mode == "markers"]
    assert [t.name for t in markers] == ["pilot", "gptune", "random", "failed"]
    assert sum(len(t.x) for t in markers[:3]) == (trials["status"] == "ok").sum()
    failed = trials[trials["status"] == "failed"]
    (crosses,) = traces(fig, "failed")
    assert crosses.marker.symbol == "x" and crosses.marker.color == plots.FAILED_COLOR
    # Failures without objectives share one spot: one cross whose hover lists them all.
    assert len(failed) > 1 and len(crosses.x) == 1
    assert crosses.hovertext[0].startswith(f"<i>{len(failed)} failed trials here</i>")
    for trial_id in failed["trial_id"]:
        assert trial_id in crosses.hovertext[0]

    ok = trials[trials["status"] == "ok"]
    row = ok[ok["arm"] == "gptune"].iloc[0]
    (gptune,) = traces(fig, "gptune")
    hover = gptune.hovertext[0]
    assert gptune.x[0] == row["train_loss"] and gptune.y[0] == row["train_time"]
    for piece in (row["trial_id"], space.describe(row.to_dict()), f"train_loss: {row['train_loss']:.6g}",
                  "round 1", "status: ok"):
        assert piece in hover
    assert "status: failed" in crosses.hovertext[0] and "OutOfMemoryError" in crosses.hovertext[0]

    assert fig.layout.xaxis.title.text == "train_loss (minimized)"
    assert fig.layout.yaxis.title.text == "train_time (minimized)"


def test_failed_trials_sit_on_the_worst_edge(one_seed):
    space, trials = one_seed
    fig = plots.pareto_figure(trials, OBJECTIVES, space)
    (crosses,) = traces(fig, "failed")
    ok = trials[trials["status"] == "ok"]
    assert set(crosses.x) == {ok["train_loss"].max()}
    assert set(crosses.y) == {ok["train_time"].max()}


def _corners(front_min: np.ndarray, shape: str) -> np.ndarray:
    """The corners a step line of ``shape`` draws between consecutive points."""
    a, b = front_min[:-1], front_min[1:]
    if shape == "hv":
        return np.column_stack([b[:, 0], a[:, 1]])
    return np.column_stack([a[:, 0], b[:, 1]])


@pytest.mark.parametrize("objectives", [OBJECTIVES, MIXED_SENSES])
def test_front_lines_are_the_pareto_fronts_drawn_as_outer_steps(tmp_path, objectives):
    space, trials = study_trials(tmp_path, objectives=objectives)
    fig = plots.pareto_figure(trials, objectives, space)
    names = list(objectives)
    for arm, label in (("pilot", "front: pilot"), ("gptune", "front: pilot + gptune")):
        members = trials[trials["arm"].isin({"pilot", arm})]
        front = pareto_front(members, objectives)
        (line,) = traces(fig, label)
        assert list(line.x) == list(front[names[0]]) and list(line.y) == list(front[names[1]])
        assert len(front) >= 2
        # Each corner of the staircase must lie on the boundary of the dominated region:
        # weakly dominated by both neighbouring front points, never better than them.
        points = to_minimization(np.column_stack([line.x, line.y]), list(objectives.values()))
        corners = _corners(points, line.line.shape)
        assert (corners >= points[:-1]).all() and (corners >= points[1:]).all()
    assert fig.layout.xaxis.title.text == f"{names[0]} ({ {'min': 'minimized', 'max': 'maximized'}[objectives[names[0]]] })"
    assert line.line.shape == ("hv" if objectives[names[0]] == "min" else "vh")


def test_two_seeds_get_a_panel_each_and_one_legend(two_seeds):
    space, trials = two_seeds
    fig = plots.pareto_figure(trials, OBJECTIVES, space)
    assert [a.text for a in fig.layout.annotations] == ["seed 0", "seed 1"]
    pilots = traces(fig, "pilot")
    assert [t.xaxis for t in pilots] == ["x", "x2"]
    assert [t.showlegend for t in pilots] == [True, False]
    for trace, seed in zip(pilots, (0, 1)):
        expected = trials[(trials["seed"] == seed) & (trials["arm"] == "pilot") & (trials["status"] == "ok")]
        assert sorted(trace.x) == sorted(expected["train_loss"])
        assert all(f"seed {seed}" in text for text in trace.hovertext)


def test_three_objectives_give_a_3d_scatter(tmp_path):
    space, trials = study_trials(tmp_path, objectives=THREE_OBJECTIVES, seeds=(0, 1))
    fig = plots.pareto_figure(trials, THREE_OBJECTIVES, space)
    assert {t.type for t in fig.data} == {"scatter3d"}
    assert fig.layout.scene.xaxis.title.text == "train_loss (minimized)"
    assert fig.layout.scene2.zaxis.title.text == "eval_accuracy (maximized)"
    (front,) = [t for t in traces(fig, "front: pilot + random") if t.scene == "scene"]
    expected = pareto_front(trials[(trials["seed"] == 0) & trials["arm"].isin({"pilot", "random"})],
                            THREE_OBJECTIVES)
    assert list(front.z) == list(expected["eval_accuracy"])
    drawn = [t for t in fig.data if t.name in ("pilot", "gptune", "random")]
    assert sum(len(t.x) for t in drawn) == (trials["status"] == "ok").sum()
    assert {t.name for t in fig.data} >= {"failed", "front: pilot"}


def test_wrong_number_of_objectives_is_refused(one_seed):
    space, trials = one_seed
    with pytest.raises(ValueError, match=r"pareto_figure: needs 2 or 3 objectives, got 1 \(\['train_loss'\]\)"):
        plots.pareto_figure(trials, {"train_loss": "min"}, space)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['eval_accuracy'\]"):
        plots.pareto_figure(trials, MIXED_SENSES, space)


def test_hypervolume_figure_shows_median_band_and_end_of_pilot(two_seeds):
    _, trials = two_seeds
    curves = hypervolume_curves(trials, OBJECTIVES)
    fig = plots.hypervolume_figure(curves)

    pilot = curves[curves["arm"] == "pilot"]
    pilot_end = pilot["n_trials"].max()
    # An arm's curve is drawn from the end of the pilot, which it repeats up to there.
    gptune = curves[(curves["arm"] == "gptune") & (curves["n_trials"] >= pilot_end)]
    (median,) = traces(fig, "gptune")
    expected = gptune.groupby("n_trials")["hypervolume"].median()
    assert median.x[0] == pilot_end and median.x[-1] == curves["n_trials"].max()
    assert list(median.x) == list(expected.index) and np.allclose(median.y, expected.to_numpy())
    (band,) = traces(fig, "gptune range")
    per_n = gptune.groupby("n_trials")["hypervolume"]
    n = len(expected)
    assert np.allclose(band.y[:n], per_n.max()) and np.allclose(band.y[n:], per_n.min()[::-1])
    assert band.fill == "toself"
    (end,) = traces(fig, "end of pilot")
    assert end.x[0] == pilot_end
    assert end.y[0] == pilot[pilot["n_trials"] == pilot_end]["hypervolume"].median()
    (pilot_line,) = traces(fig, "pilot")
    assert list(pilot_line.x) == list(range(1, pilot_end + 1))


def test_pareto_set_lists_the_front_of_all_arms_and_of_each(two_seeds):
    space, trials = two_seeds
    fig = plots.pareto_set_figure(trials, OBJECTIVES, space)
    (table,) = fig.data
    headers = [h.replace("<b>", "").replace("</b>", "") for h in table.header.values]
    assert headers == ["seed", "front", "trial id", "found by", "round", "lora_rank", "lora_alpha",
                       "learning_rate", "train_loss (minimized)", "train_time (minimized)"]
    columns = dict(zip(headers, table.cells.values))
    rows = pd.DataFrame(columns)
    assert set(rows["front"]) == {"all arms", "pilot + gptune", "pilot + random"}
    for seed in (0, 1):
        per_seed = trials[trials["seed"] == seed]
        mine = rows[(rows["seed"] == str(seed)) & (rows["front"] == "pilot + random")]
        expected = pareto_front(per_seed[per_seed["arm"].isin({"pilot", "random"})], OBJECTIVES)
        assert list(mine["trial id"]) == list(expected["trial_id"])
        everything = rows[(rows["seed"] == str(seed)) & (rows["front"] == "all arms")]
        assert list(everything["trial id"]) == list(
            pareto_front(per_seed.drop_duplicates("trial_id"), OBJECTIVES)["trial_id"]
        )


def test_write_html_shares_one_plotly_js_with_the_hover_text(one_seed, tmp_path):
    space, trials = one_seed
    fig = plots.pareto_figure(trials, OBJECTIVES, space)
    path = tmp_path / "plots" / "pareto.html"
    plots.write_html(fig, path)
    page = path.read_text()
    row = trials[trials["status"] == "ok"].iloc[0]
    assert row["trial_id"] in page and space.describe(row.to_dict()) in page
    # plotly.js is not embedded but loaded from the one copy beside the page (works offline).
    assert "* plotly.js v" not in page and 'src="plotly.min.js"' in page
    library = path.parent / "plotly.min.js"
    assert library.read_text().count("* plotly.js v") == 1
    first, written = path.read_bytes(), library.stat().st_mtime_ns
    plots.write_html(fig, path)
    plots.write_html(fig, path.parent / "other.html")
    assert path.read_bytes() == first  # deterministic: reruns change nothing
    assert library.stat().st_mtime_ns == written  # written once per folder


def test_report_embeds_plotly_once_with_every_section(two_seeds):
    space, trials = two_seeds
    report = plots.report_html(
        "loratune study <demo>",
        [
            ("Pareto fronts", plots.pareto_figure(trials, OBJECTIVES, space)),
            ("Hypervolume", plots.hypervolume_figure(hypervolume_curves(trials, OBJECTIVES))),
            ("Pareto set", plots.pareto_set_figure(trials, OBJECTIVES, space)),
            ("Notes", "losses < 2 & times in s"),
        ],
    )
    assert report.startswith("<!DOCTYPE html>") and report.count("* plotly.js v") == 1
    assert "<title>loratune study &lt;demo&gt;</title>" in report
    for index, heading in enumerate(["Pareto fronts", "Hypervolume", "Pareto set"]):
        assert f'<h2 id="section-{index}-heading">{heading}</h2>' in report and f'id="section-{index}"' in report
        assert f'<a href="#section-{index}-heading">{heading}</a>' in report
    assert "<p>losses &lt; 2 &amp; times in s</p>" in report
    assert trials["trial_id"].iloc[-1] in report
    markup = plots.report_html("t", [("table", plots.Html("<table><tr><td>1</td></tr></table>"))])
    assert '<div id="section-0"><table><tr><td>1</td></tr></table></div>' in markup
    with pytest.raises(TypeError, match="section 'x' holds a int"):
        plots.report_html("t", [("x", 3)])


# ---- the report's data, figure by figure ----------------------------------------------------
def tiny_trials(values, statuses=None, arms=None) -> pd.DataFrame:
    """Trials of one seed with two minimized objectives ``values`` [(a, b), ...]."""
    n = len(values)
    return pd.DataFrame({
        "seed": 0, "arm": arms or ["pilot"] * n, "round": [0 if (arms or ["pilot"] * n)[i] == "pilot" else 1
                                                           for i in range(n)],
        "trial_id": [f"t{i}" for i in range(n)], "status": statuses or ["ok"] * n,
        "train_loss": [v[0] for v in values], "train_time": [v[1] for v in values],
    })


def test_the_knee_is_the_front_point_nearest_the_ideal_in_normalized_objectives():
    # Normalized over the Pareto set: (0, 1), (0.3, 0.3) and (1, 0); (0.9, 0.9) is dominated.
    trials = tiny_trials([(0.0, 20.0), (3.0, 13.0), (10.0, 10.0), (9.0, 19.0), (1.0, 10.5)],
                         statuses=["ok", "ok", "ok", "ok", "failed"])
    trials.loc[4, ["train_loss", "train_time"]] = np.nan
    recommended = report.recommended_trials(trials, OBJECTIVES)
    assert list(recommended["trial_id"]) == ["t0", "t1", "t2"]
    assert list(recommended["knee"]) == [False, True, False]
    assert recommended["distance"].tolist() == pytest.approx([1.0, np.hypot(0.3, 0.3), 1.0])
    # A maximized objective is turned round first: t2 (largest loss, least time) then dominates.
    flipped = report.recommended_trials(trials, {"train_loss": "max", "train_time": "min"})
    assert flipped["trial_id"].tolist() == ["t2"] and flipped["knee"].tolist() == [True]
    assert flipped["distance"].tolist() == pytest.approx([0.0])
    # A far-off dominated trial (a diverged loss of 90) does not squeeze the front's losses: scaled
    # over the study, t2 (0.11, 0) would be the knee before t1 (0.03, 0.2); over the front it is t1.
    far = tiny_trials([(0.0, 20.0), (3.0, 13.0), (10.0, 10.0), (90.0, 25.0)])
    knee = report.recommended_trials(far, OBJECTIVES)
    assert knee.loc[knee["knee"], "trial_id"].tolist() == ["t1"]


def test_trial_counts_count_each_trial_once_by_status_with_its_seconds():
    trials = tiny_trials([(1, 1), (2, 2), (3, 3), (4, 4)], statuses=["ok", "stopped", "failed", "ok"],
                         arms=["pilot", "a", "a", "b"])
    trials["train_seconds"] = [10.0, 4.0, 1.5, 10.0]
    shared = trials.iloc[[3]].assign(arm="a")  # one point two arms proposed: trained once
    counts = report.trial_counts(pd.concat([trials, shared], ignore_index=True))
    assert counts == {"trials": 4, "ok": 2, "stopped": 1, "failed": 1, "train_seconds": 25.5}


def test_hypervolume_cost_curves_start_at_the_end_of_the_pilot_sorted_by_cost(two_seeds):
    space, trials = two_seeds
    trials = trials.assign(train_seconds=np.arange(len(trials), dtype=float) % 7 + 1)
    curves = hypervolume_curves(trials, OBJECTIVES)
    table = report.hypervolume_cost_curves(curves, "train_seconds")
    for (arm, seed), rows in table.groupby(["arm", "seed"]):
        pilot_n = (trials[(trials["seed"] == seed) & (trials["arm"] == "pilot")]).shape[0]
        assert rows["n_trials"].min() == (1 if arm == "pilot" else pilot_n)
        assert rows["train_seconds"].is_monotonic_increasing
        assert rows["hypervolume"].is_monotonic_increasing
    assert list(pd.unique(table["arm"])) == ["pilot", "gptune", "random"]
    fig = plots.hypervolume_cost_figure(table, "train_seconds")
    assert {t.name for t in fig.data} == {"pilot", "gptune", "random"} and len(fig.data) == 6


def test_slice_data_holds_every_finite_value_per_parameter_and_objective(one_seed):
    space, trials = one_seed
    slices = report.slice_data(trials, OBJECTIVES, space)
    finite = trials[trials["train_loss"].notna()]
    assert len(slices) == len(finite) * len(space.tunable_names) * len(OBJECTIVES)
    row = finite.iloc[0]
    mine = slices[(slices["trial_id"] == row["trial_id"]) & (slices["arm"] == row["arm"])]
    lr = mine[(mine["parameter"] == "learning_rate") & (mine["objective"] == "train_time")]
    assert lr["value"].item() == row["learning_rate"] and lr["objective_value"].item() == row["train_time"]
    fig = plots.slice_figure(slices, OBJECTIVES, space)
    assert fig.layout.xaxis3.type == "log"  # learning_rate is log-scaled


def test_contour_data_interpolates_a_plane_exactly_and_needs_lr_alpha_rank(one_seed):
    space, trials = one_seed
    trials = trials.assign(status="ok")
    x, y = np.log10(trials["learning_rate"]), np.log2(trials["lora_alpha"] / trials["lora_rank"])
    trials["train_loss"] = 2 * x - y + 1
    contour = report.contour_data(trials, "train_loss", space, resolution=25)
    X, Y = np.meshgrid(contour["x"], contour["y"])
    inside = np.isfinite(contour["z"])
    assert inside.mean() > 0.3
    assert contour["z"][inside] == pytest.approx((2 * X - Y + 1)[inside])
    assert len(contour["points"]) == len(trials)
    no_alpha = SearchSpace.from_config({"lora_rank": {"type": "int", "low": 4, "high": 64, "step": 4},
                                        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2}})
    assert report.contour_data(trials, "train_loss", no_alpha) is None
    assert report.contour_data(trials.iloc[:2], "train_loss", space) is None


def test_timeline_lanes_split_overlapping_trials_of_one_device():
    trials = tiny_trials([(1, 1)] * 4, arms=["pilot", "pilot", "pilot", "pilot"])
    trials["started_at"] = ["2026-12-01T10:00:00+00:00", "2026-12-01T10:00:05+00:00",
                            "2026-12-01T10:00:20+00:00", "2026-12-01T10:00:00+00:00"]
    trials["finished_at"] = ["2026-12-01T10:00:10+00:00", "2026-12-01T10:00:15+00:00",
                             "2026-12-01T10:00:30+00:00", ""]
    trials["hostname"] = "node1"
    trials["cuda_visible_devices"] = [0, 0, 0, 1]
    timeline = report.timeline_data(trials)
    # t3 has no finish time; t1 overlaps t0 (lane #2), t2 starts after both ended (back to lane 1).
    assert dict(zip(timeline["trial_id"], timeline["lane"])) == {
        "t0": "node1 GPU 0", "t1": "node1 GPU 0 #2", "t2": "node1 GPU 0"}
    fig = plots.timeline_figure(timeline)
    assert fig.data[0].x.tolist() == [10000.0, 10000.0, 10000.0]


def test_curves_of_stopped_and_finished_trials_reach_the_learning_curve_data(one_seed, tmp_path):
    space, trials = one_seed
    first, second = trials["trial_id"].iloc[0], trials["trial_id"].iloc[1]
    full = tmp_path / "seed0" / "trials" / first / "metrics.json"
    curve = [{"step": 10, "eval_loss": 2.0, "train_loss": 2.5, "train_time": 1.0},
             {"step": 20, "eval_loss": 1.5, "train_loss": 2.0, "train_time": 2.0}]
    ledger.atomic_write_text(full, __import__("json").dumps({"trial_id": first, "curve": curve}))
    for step in (10, 20):  # a stopped trial: only its rungs' metrics, the highest one counts
        rung = tmp_path / "seed0" / "trials" / second / f"step{step}" / "metrics.json"
        ledger.atomic_write_text(rung, __import__("json").dumps({"trial_id": second, "curve": curve[: step // 10]}))
    curves = trial_curves(trials, tmp_path)
    assert list(curves.columns) == report.CURVE_COLUMNS
    assert curves.groupby("trial_id").size().to_dict() == {first: 2, second: 2}
    data = report.learning_curve_data(curves, trials, OBJECTIVES)
    assert set(data["arm"]) == {"pilot"} and data["step"].tolist() == [10, 20, 10, 20]
    front = pareto_front(trials, OBJECTIVES)["trial_id"]
    assert data["on_front"].tolist() == [t in set(front) for t in data["trial_id"]]
    fig = plots.learning_curves_figure(data)
    assert len(fig.data) == 4  # two trials, two panels


def test_summary_marks_the_knee_and_gives_adapter_paths(one_seed):
    space, trials = one_seed
    recommended = report.recommended_trials(trials, OBJECTIVES)
    recommended["adapter"] = ["results/s/seed0/trials/x/adapter"] + [""] * (len(recommended) - 1)
    page = plots.summary_html([("study", "demo <1>")], recommended, OBJECTIVES, space)
    assert "<dd>demo &lt;1&gt;</dd>" in page
    assert page.count('<tr class="knee">') == 1 and page.count("★ knee</td>") == 1
    assert "<code>results/s/seed0/trials/x/adapter</code>" in page
    assert page.count("not kept") == len(recommended) - 1
