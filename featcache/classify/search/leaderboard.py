"""What a search leaves in its folder: the leaderboard (CSV and JSON), the top trials tested,
the best trial retrained as an ordinary run directory (``best/``), and Optuna's plots.

Only the top :data:`TESTED` complete trials ever see the test split, retrained by ``train``'s
own code with the trial's settings and seed, after the ranking on validation is fixed. Their
scores are kept in the study (user attribute ``tested``), so finishing again (another
worker, a rerun) reuses them instead of training again.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import warnings

from ..train import harness
from ..runs import run_dir as rundir

TESTED = 3  # complete trials, best first, scored on the test split (never used to rank)
BEST_DIR = "best"
FILES = {"leaderboard_csv": "leaderboard.csv", "leaderboard_json": "leaderboard.json",
         "leaderboard_html": "leaderboard.html", "summary": "search.json", "history_plot": "optimization_history.png",
         "intermediate_plot": "intermediate_values.png", "importance_plot": "param_importances.png"}


def _metric(trial) -> tuple[float | None, float | None]:
    """(objective loss, accuracy) of a trial: validation, or the mean over cv folds."""
    result = trial.user_attrs.get("result") or {}
    if "cv" in result:
        return result["cv"]["loss_mean"], result["cv"]["accuracy_mean"]
    val = result.get("validation") or {}
    return trial.value if trial.value is not None else val.get("loss"), val.get("accuracy")


def _note(trial) -> str:
    attrs = trial.user_attrs
    return attrs.get("pruned") or attrs.get("error") or ""


def board(trials) -> list[dict]:
    """Every trial, the complete ones ranked first (lowest loss, then highest accuracy)."""
    rows = []
    for t in trials:
        attrs = t.user_attrs
        loss, acc = _metric(t)
        result = attrs.get("result") or {}
        rows.append({
            "rank": None, "trial": t.number, "state": t.state.name, "head": attrs.get("head"),
            "feature_set": attrs.get("feature_set"), "params": attrs.get("options", {}),
            "loss": loss if t.state.name in ("COMPLETE", "PRUNED") else None, "accuracy": acc,
            "cv": result.get("cv"),
            "epochs_run": result.get("epochs_run", len(t.intermediate_values) or None),
            "seconds": round(t.duration.total_seconds(), 3) if t.duration else None,
            "test": None, "note": _note(t), "worker_pid": (attrs.get("worker") or {}).get("pid"),
        })
    order = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "WAITING": 4}
    inf = float("inf")
    rows.sort(key=lambda r: (order.get(r["state"], 5), r["loss"] if r["loss"] is not None else inf,
                             -(r["accuracy"] or 0), r["trial"]))
    for rank, row in enumerate((r for r in rows if r["state"] == "COMPLETE"), 1):
        row["rank"] = rank
    return rows


def counts(trials) -> dict:
    states = [t.state.name for t in trials]
    return {"total": len(states), **{s.lower(): states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")},
            "finished": states.count("COMPLETE") + states.count("PRUNED")}


def trial_line(trial, finished: int, wanted: int) -> str:
    """One progress line per finished trial."""
    attrs = trial.user_attrs
    params = ", ".join(f"{k}={_short(v)}" for k, v in attrs.get("options", {}).items() if k not in ("seed", "early_stopping"))
    loss, acc = _metric(trial)
    if trial.state.name == "COMPLETE":
        outcome = f"loss {loss:.4f} accuracy {acc:.4f}"
    else:
        outcome = f"{trial.state.name.lower()}: {_note(trial)}"
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    return (f"trial {trial.number} [{finished}/{wanted} finished] {attrs.get('head')} on {attrs.get('feature_set')} "
            f"({params}) -> {outcome} ({seconds:.1f} s)")


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def finish(study, out: str, store: str, cv: int | None, budget_mb: float, log) -> dict:
    """Rank, test the top trials, (re)write best/, the leaderboard files and the plots.
    Called under the search folder's lock."""
    trials = study.get_trials(deepcopy=False)
    rows = board(trials)
    notes = []
    best = _test_top(study, rows, out, store, budget_mb, log)
    if best is None:
        notes.append("no complete trial yet: no best run, nothing tested")
    _write_board(rows, out, cv)
    plots, plot_notes = _plots(study, out, cv)
    notes += plot_notes
    _write_board_page(rows, out, cv, best, plots)
    result = {"counts": counts(trials), "best": best, "leaderboard": rows,
              "files": {**{k: os.path.join(out, v) for k, v in FILES.items()
                           if k.endswith(("csv", "json", "html", "summary"))}, **plots}, "notes": notes}
    if best:
        result["files"]["best_run"] = best["run_dir"]
    rundir.write_json(os.path.join(out, FILES["summary"]), {k: v for k, v in result.items() if k != "leaderboard"})
    return result


def _test_top(study, rows: list[dict], out: str, store: str, budget_mb: float, log) -> dict | None:
    ranked = [r for r in rows if r["rank"] is not None][:TESTED]
    if not ranked:
        return None
    tested = dict(study.user_attrs.get("tested", {}))
    best_dir = os.path.join(out, BEST_DIR)
    for row in ranked:
        key = str(row["trial"])
        is_best = row["rank"] == 1
        have_best = study.user_attrs.get("best_trial") == row["trial"] and os.path.isfile(os.path.join(best_dir, rundir.CONFIG))
        if key not in tested or (is_best and not have_best):
            log(f"testing trial {row['trial']} (rank {row['rank']})" + (f": retraining it into {best_dir}" if is_best else ""))
            summary = _retrain(row, store, out if is_best else None, budget_mb)
            tested[key] = {s: summary[s] for s in ("train", "validation", "test")}
            tested[key]["seconds"] = summary["seconds"]
            if is_best:
                study.set_user_attr("best_trial", row["trial"])
            study.set_user_attr("tested", tested)
        row["test"] = tested[key]["test"]
    top = ranked[0]
    again = tested[str(top["trial"])]
    return {"trial": top["trial"], "head": top["head"], "feature_set": top["feature_set"], "params": top["params"],
            "loss": top["loss"], "accuracy": top["accuracy"], "retrained": {s: again[s] for s in ("train", "validation")},
            "test": again["test"], "run_dir": best_dir}


def _retrain(row: dict, store: str, out: str | None, budget_mb: float) -> dict:
    """``train`` with the trial's settings; with ``out``, into out/best (replaced whole)."""
    if out is None:
        return harness.train(store, row["feature_set"], head=row["head"], memory_budget_mb=budget_mb, **row["params"])
    for stale in glob.glob(os.path.join(out, BEST_DIR + ".*")):  # left by a finish that was killed
        shutil.rmtree(stale, ignore_errors=True)
    partial, old, best = (os.path.join(out, f"{BEST_DIR}{suffix}") for suffix in (".partial", ".old", ""))
    summary = harness.train(store, row["feature_set"], head=row["head"], out=partial, memory_budget_mb=budget_mb,
                            **row["params"])
    if os.path.exists(best):
        os.replace(best, old)
    os.replace(partial, best)
    shutil.rmtree(old, ignore_errors=True)
    summary["run_dir"] = best
    return summary


def _write_board(rows: list[dict], out: str, cv: int | None) -> None:
    objective = f"cv{cv}" if cv else "validation"
    rundir.write_json(os.path.join(out, FILES["leaderboard_json"]), {"objective": f"{objective} loss", "trials": rows})
    params = sorted({k for r in rows for k in r["params"]})
    columns = ["rank", "trial", "state", "head", "feature_set", f"{objective}_loss", f"{objective}_accuracy",
               "epochs_run", "seconds", "test_accuracy", "test_loss", "note", *params]
    tmp = os.path.join(out, FILES["leaderboard_csv"] + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            test = r["test"] or {}
            writer.writerow([r["rank"], r["trial"], r["state"], r["head"], r["feature_set"], r["loss"], r["accuracy"],
                             r["epochs_run"], r["seconds"], test.get("accuracy"), test.get("loss"), r["note"],
                             *(r["params"].get(p) for p in params)])
    os.replace(tmp, os.path.join(out, FILES["leaderboard_csv"]))


def _write_board_page(rows: list[dict], out: str, cv: int | None, best: dict | None, plots: dict) -> None:
    """leaderboard.html: every trial, the best one linked to its run's report (best/report.html)."""
    from ..report.leaderboard_page import write_leaderboard

    objective = f"cv{cv}" if cv else "validation"
    report = os.path.join(BEST_DIR, "report.html")
    has_report = best is not None and os.path.isfile(os.path.join(out, report))
    flat = [{"rank": r["rank"], "trial": r["trial"], "state": r["state"], "head": r["head"],
             "feature_set": r["feature_set"], "loss": r["loss"], "accuracy": r["accuracy"],
             "test_accuracy": (r["test"] or {}).get("accuracy"), "seconds": r["seconds"],
             "params": ", ".join(f"{k}={_short(v)}" for k, v in sorted(r["params"].items()))} for r in rows]
    links = [report if has_report and r["trial"] == best["trial"] else None for r in rows]
    columns = [("rank", "#"), ("trial", "trial"), ("state", "state"), ("head", "head"),
               ("feature_set", "feature set"), ("loss", f"{objective} loss"), ("accuracy", f"{objective} acc"),
               ("test_accuracy", "test acc (top 3)"), ("seconds", "seconds", ".1f"), ("params", "settings")]
    notes = [f"ranked on {objective} loss; the test split is scored for the top {TESTED} only, never to choose",
             *(f"plot: {os.path.basename(path)}" for path in plots.values())]
    write_leaderboard(os.path.join(out, FILES["leaderboard_html"]), f"featcache search: {os.path.basename(out)}",
                      columns, flat, links, notes=notes)


def _plots(study, out: str, cv: int | None) -> tuple[dict, list[str]]:
    """Optuna's matplotlib plots as PNG; a note for each one that cannot be drawn yet."""
    import matplotlib
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm

    target = f"cv{cv} loss" if cv else "validation loss"
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varying = [p for p in {k for t in complete for k in t.params}
               if len({json.dumps(t.params.get(p), default=str) for t in complete}) > 1]
    wanted = {
        "history_plot": (lambda: ovm.plot_optimization_history(study, target_name=target),
                         None if complete else "optimization history: no complete trial yet"),
        "intermediate_plot": (lambda: ovm.plot_intermediate_values(study),
                              None if any(t.intermediate_values for t in study.get_trials(deepcopy=False))
                              else "intermediate values: no trial reported per-epoch losses (no dense trial)"),
        "importance_plot": (lambda: ovm.plot_param_importances(study, target_name=target),
                            None if len(complete) >= 2 and varying else
                            f"parameter importances: need at least 2 complete trials whose parameters vary "
                            f"(have {len(complete)} complete, {len(varying)} varying parameters); not plotted"),
    }
    files, notes = {}, []
    for key, (draw, why_not) in wanted.items():
        path = os.path.join(out, FILES[key])
        if why_not:
            notes.append(why_not)
            if os.path.exists(path):
                os.remove(path)  # an older plot would show an older study
            continue
        # Optuna's plots set a global style sheet: keep it inside this block.
        with matplotlib.rc_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                ax = draw()
            except Exception as exc:  # a plot is a by-product: say why it is missing, keep the search
                notes.append(f"{FILES[key]}: not plotted ({type(exc).__name__}: {exc})")
                continue
            fig = ax.figure
            fig.set_size_inches(9, 5)
            fig.savefig(path + ".tmp.png", dpi=100, bbox_inches="tight")
            plt.close(fig)
        os.replace(path + ".tmp.png", path)
        files[key] = path
    return files, notes
