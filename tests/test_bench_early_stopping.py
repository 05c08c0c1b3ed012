"""bench/early_stopping.py's goal check, on hand-made hypervolume curves with a known answer."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.early_stopping import goal, schedule_label, schedule_spec


def run(variant: str, seed: int, points: list[tuple[float, float]], pilot_hv: float = 0.5) -> list[dict]:
    """One run's events: a pilot event (round 0) and then (seconds, hv) pairs of its own trials."""
    rows = [{"variant": variant, "seed": seed, "round": 0, "hv": pilot_hv, "steady_seconds": 0.0}]
    rows += [{"variant": variant, "seed": seed, "round": 1, "hv": hv, "steady_seconds": t} for t, hv in points]
    return [{"problem": "p", "proposer": "optuna-gp", **row} for row in rows]


def curves(es_reach: list[float]) -> pd.DataFrame:
    """Per seed, 'full' reaches HV 0.9 at its end (90 s); 'es' reaches 0.9 after es_reach[seed] s."""
    events = []
    for seed, reach in enumerate(es_reach):
        events += run("full", seed, [(30.0, 0.7), (60.0, 0.8), (90.0, 0.9)])
        events += run("es0", seed, [(reach / 2, 0.75), (reach, 0.9)])
    return pd.DataFrame(events)


def test_the_fraction_is_the_median_of_the_seeds_seconds_to_full_final_hv():
    table = goal(curves([20.0, 30.0, 45.0, 60.0, 90.0]), "es0", accounting="steady").iloc[0]
    assert np.isclose(table["fraction_median"], 45.0 / 90.0)
    assert table["reached"] == table["counted"] == 5
    # The bootstrap interval of the median holds the median and lies inside the seeds' range.
    assert 20.0 / 90 <= table["median_low"] <= table["fraction_median"] <= table["median_high"] <= 1.0
    # The median es curve at a third of the axis (30 s): the seeds at 20 and 30 s are at 0.9, the
    # others at 0.75 or their pilot's 0.5: the median is 0.75.
    assert np.isclose(table["hv_es_third"], 0.75)


def test_an_arm_that_never_reaches_the_target_counts_as_infinity_and_is_below():
    events = pd.DataFrame(run("full", 0, [(10.0, 0.9), (30.0, 0.9)]) + run("es0", 0, [(60.0, 0.6)]))
    table = goal(events, "es0", accounting="steady").iloc[0]
    assert table["fraction_median"] == np.inf and table["reached"] == 0
    # Below from 10 s (full at 0.9, es at its pilot's 0.5) to the end of the 30 s axis: 2/3 of it.
    assert np.isclose(table["below_share"], 2 / 3, atol=0.01) and np.isclose(table["worst_gap"], -0.4)


def test_a_schedule_entry_names_its_promotion_and_lead():
    entry = [[0.167, 0.333, 1.0], 0.334, "multi_fidelity", 1]
    assert schedule_spec(entry) == {"rungs": entry[0], "keep": 0.334, "promote": "multi_fidelity", "lead": 1}
    assert schedule_label([entry], "es0") == "es0 [0.167, 0.333, 1.0] keep 0.334 promote multi_fidelity lead 1"
