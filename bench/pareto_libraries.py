"""Our own hypervolume and non-dominated sorting against moocore's and pygmo's.

"Ours" is ``loratune/pareto.py`` as it was at ``FORMER``, the last commit with our own exact
algorithms (loaded from git history); loratune now calls moocore, on this measurement. For 2,
3 and 4 objectives and fronts of several sizes (uniform random points, most of them dominated,
with repeated rows; points on a sphere, all non-dominated) it checks that the three agree and
times each. Run in a git checkout: ``.venv/bin/python bench/pareto_libraries.py [--out FILE.md]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import moocore  # noqa: E402
import pygmo  # noqa: E402

FORMER = "82faec8"


def _former_pareto() -> types.ModuleType:
    path = f"{FORMER}:loratune/pareto.py"
    source = subprocess.run(["git", "show", path], cwd=REPO, capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("former_pareto")
    exec(compile(source, path, "exec"), module.__dict__)
    return module


from loratune import pareto as current  # noqa: E402

_former = _former_pareto()
hypervolume, non_dominated = _former.hypervolume, _former.non_dominated

# Our exact recursion slices m=4 into 3-objective problems: 1000 points there would take minutes.
SIZES = {2: (10, 50, 200, 1000), 3: (10, 50, 200, 1000), 4: (10, 50, 200)}
REFERENCE = 1.1


def fronts(m: int, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, m, n])
    sphere = np.abs(rng.normal(size=(n, m)))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)
    uniform = rng.random((n, m))
    # Ties and repeated rows, as snapped trials and shared pilot points give them.
    uniform[n // 2 :: 7] = uniform[: len(uniform[n // 2 :: 7])]
    return {"uniform": uniform, "sphere": sphere}


def seconds(call, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def pygmo_first_front(Y: np.ndarray) -> np.ndarray:
    fronts, *_ = pygmo.fast_non_dominated_sorting(Y)
    mask = np.zeros(len(Y), dtype=bool)
    mask[fronts[0]] = True
    return mask


def measure() -> list[dict]:
    rows = []
    for m, sizes in SIZES.items():
        ref = np.full(m, REFERENCE)
        for n in sizes:
            for kind, Y in fronts(m, n, seed=0).items():
                ours_hv = hypervolume(Y, ref)
                moo_hv = moocore.hypervolume(Y, ref=ref)
                pg_hv = pygmo.hypervolume(Y).compute(ref)
                ours_nd = non_dominated(Y)
                row = {
                    "m": m,
                    "n": n,
                    "kind": kind,
                    "front": int(ours_nd.sum()),
                    "hv_rel_diff_moocore": abs(moo_hv - ours_hv) / ours_hv,
                    "hv_rel_diff_pygmo": abs(pg_hv - ours_hv) / ours_hv,
                    # Ours keeps every copy of a front point; moocore's keep_weakly does the same.
                    "nd_same_moocore": bool(np.array_equal(moocore.is_nondominated(Y, keep_weakly=True), ours_nd)),
                    "nd_same_pygmo": bool(np.array_equal(pygmo_first_front(Y), ours_nd)),
                }
                repeat = 1 if n == max(sizes) and m > 2 else 5
                row["hv_s_ours"] = seconds(lambda: hypervolume(Y, ref), repeat)
                row["hv_s_moocore"] = seconds(lambda: moocore.hypervolume(Y, ref=ref), repeat)
                row["hv_s_pygmo"] = seconds(lambda: pygmo.hypervolume(Y).compute(ref), repeat)
                row["nd_s_ours"] = seconds(lambda: non_dominated(Y), repeat)
                row["nd_s_moocore"] = seconds(lambda: moocore.is_nondominated(Y, keep_weakly=True), repeat)
                row["nd_s_pygmo"] = seconds(lambda: pygmo_first_front(Y), repeat)
                rows.append(row)
                print(row, flush=True)
    return rows


def running_hypervolume_seconds(m: int, n: int) -> dict[str, float]:
    """The shape of the workflow's use: the hypervolume after each of n trials (hypervolume_curves)."""
    Y = fronts(m, n, seed=1)["uniform"]
    ref = np.full(m, REFERENCE)
    return {
        "ours": seconds(lambda: [hypervolume(Y[:k], ref) for k in range(1, n + 1)], 3),
        "moocore": seconds(lambda: [moocore.hypervolume(Y[:k], ref=ref) for k in range(1, n + 1)], 3),
        "loratune now": seconds(lambda: [current.hypervolume(Y[:k], ref) for k in range(1, n + 1)], 3),
    }


def _one_line(error: Exception) -> str:
    return f"{type(error).__name__}: " + " ".join(str(error).split())


def edge_cases() -> list[str]:
    """What each does with the inputs a study's tables hold: failed trials (NaN), points on or past the reference."""
    ref = np.array([1.0, 1.0])
    lines = []
    with_nan = np.array([[0.2, 0.5], [np.nan, 0.1], [0.5, 0.2]])
    lines.append(
        f"NaN row: ours hypervolume {hypervolume(with_nan, ref):.6g}, non_dominated {non_dominated(with_nan).tolist()}"
    )
    for name, call in (
        ("moocore.hypervolume", lambda: moocore.hypervolume(with_nan, ref=ref)),
        ("moocore.is_nondominated", lambda: moocore.is_nondominated(with_nan, keep_weakly=True).tolist()),
        ("pygmo.hypervolume", lambda: pygmo.hypervolume(with_nan).compute(ref)),
    ):
        try:
            lines.append(f"NaN row: {name} -> {call()}")
        except Exception as error:  # the point is to record what each library does
            lines.append(f"NaN row: {name} raises {_one_line(error)}")
    outside = np.array([[0.2, 0.5], [1.5, 0.1]])
    lines.append(f"point past the reference: ours {hypervolume(outside, ref):.6g}")
    for name, call in (
        ("moocore", lambda: moocore.hypervolume(outside, ref=ref)),
        ("pygmo", lambda: pygmo.hypervolume(outside).compute(ref)),
    ):
        try:
            lines.append(f"point past the reference: {name} -> {call():.6g}")
        except Exception as error:
            lines.append(f"point past the reference: {name} raises {_one_line(error)}")
    return lines


def report(rows: list[dict], running: dict, edges: list[str]) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    worst_moo = max(r["hv_rel_diff_moocore"] for r in rows)
    worst_pg = max(r["hv_rel_diff_pygmo"] for r in rows)
    out = [
        f"# Pareto libraries against our former loratune.pareto ({FORMER}); measured at {commit}",
        "",
        f"moocore {moocore.__version__}, pygmo {pygmo.__version__}, numpy {np.__version__}; "
        f"reference point {REFERENCE} in every objective; median of 5 runs (1 for the largest m>2 sets).",
        "Produced by `bench/pareto_libraries.py` on the 2-core CPU machine (shared with other jobs, so",
        "absolute times are noisy; the ratios are what the decision rests on).",
        "",
        f"Correctness: the largest relative hypervolume difference to ours is {worst_moo:.1e} (moocore) and "
        f"{worst_pg:.1e} (pygmo); non-dominated masks equal ours in "
        f"{sum(r['nd_same_moocore'] for r in rows)}/{len(rows)} cases (moocore, keep_weakly=True) and "
        f"{sum(r['nd_same_pygmo'] for r in rows)}/{len(rows)} (pygmo's first front).",
        "",
        "| m | n | points | front | HV ours s | HV moocore s | HV pygmo s | ND ours s | ND moocore s | ND pygmo s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['m']} | {r['n']} | {r['kind']} | {r['front']} | {r['hv_s_ours']:.2e} | {r['hv_s_moocore']:.2e} | "
            f"{r['hv_s_pygmo']:.2e} | {r['nd_s_ours']:.2e} | {r['nd_s_moocore']:.2e} | {r['nd_s_pygmo']:.2e} |"
        )
    out += ["", "Hypervolume after each trial (the shape of `hypervolume_curves`), seconds:", ""]
    for (m, n), t in running.items():
        out.append(
            f"- m={m}, n={n}: ours {t['ours']:.3f}, moocore {t['moocore']:.3f}, "
            f"loratune now (moocore behind its checks) {t['loratune now']:.3f}"
        )
    out += ["", "Inputs a study's tables hold:", ""] + [f"- {line}" for line in edges]
    out += [
        "",
        "Decision: loratune.pareto calls moocore for the hypervolume and for non-dominated sorting",
        "(equal results, faster everywhere, by orders of magnitude with 3-4 objectives), keeping",
        "its own checks around them: a NaN row (a failed trial) is filtered out first, since",
        "moocore would call it the only non-dominated point; points outside the reference box are",
        "dropped first (pygmo refuses them). pygmo is not used: correct too, but it rejects such",
        "points and is slower than moocore in most rows. best_subset_hypervolumes stays ours (no",
        "library has it).",
        "",
    ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = measure()
    running = {(m, n): running_hypervolume_seconds(m, n) for m, n in ((2, 200), (3, 200), (4, 100))}
    text = report(rows, running, edge_cases())
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
