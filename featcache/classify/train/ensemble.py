"""Ensembles: the class probabilities of several runs on the same images, averaged.

``featcache ensemble RUN_DIR... --out DIR [--weights equal|fit]``. Members are runs of any kind
but ensemble (heads, fused heads, fine-tuned models), trained on the same images: their rows
are matched by (path, content digest) across their stores, and runs whose class names,
images, splits or labels differ are refused. Each member's probabilities come from its own
model on its cached features (a fine-tuned member decodes its images), so building an ensemble
costs no training.

Weights: ``equal`` (1/M each) or ``fit``: non-negative weights summing to 1 that minimise the
validation log loss of the mixture, a convex problem solved by SLSQP on the simplex from the
equal weights (deterministic). Validation metrics of a fitted ensemble are therefore
optimistic; the test split is the honest score, and it is never used to fit.

The run directory is an ordinary one (config.json with kind "ensemble", metrics.json,
history.csv, confusion_matrix.png, plus members.png and report.html); ``predict``, ``export``
and ``report`` accept it.
"""
from __future__ import annotations

import os
import time

import numpy as np

from ...errors import FeatcacheError
from .. import evaluation as reports
from ..runs import run_dir as rundir
from ..runs.cached import CachedInputs
from ..runs.kinds import load_run

from ...cache.layout import SPLITS
WEIGHTINGS = ("equal", "fit")
MEMBERS_PLOT = "members.png"
EPS = 1e-15  # probabilities are clipped here before the log, as scikit-learn's log_loss does


def fit_weights(probas: list[np.ndarray], labels: np.ndarray) -> tuple[np.ndarray, dict]:
    """Weights w >= 0, sum 1, minimising the mean log loss of sum_i w_i p_i on (labels).

    -log of a linear function is convex, so SLSQP from the equal weights finds the minimum."""
    from scipy.optimize import minimize

    m = len(probas)
    truth = np.stack([np.asarray(p, np.float64)[np.arange(len(labels)), labels] for p in probas], axis=1)

    def loss(w):
        return float(-np.mean(np.log(np.clip(truth @ w, EPS, None))))

    def grad(w):
        mix = np.clip(truth @ w, EPS, None)
        return -(truth / mix[:, None]).mean(axis=0)

    start = np.full(m, 1.0 / m)
    result = minimize(loss, start, jac=grad, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                      constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1.0, "jac": lambda w: np.ones(m)}],
                      options={"ftol": 1e-12, "maxiter": 1000})
    weights = np.clip(result.x, 0.0, None)
    weights = weights / weights.sum()
    if loss(weights) > loss(start):  # never worse than where it started
        weights = start
    info = {"method": "SLSQP on the simplex (scipy.optimize), from equal weights", "iterations": int(result.nit),
            "converged": bool(result.success), "message": str(result.message),
            "validation_loss_equal": loss(start), "validation_loss_fitted": loss(weights)}
    return weights, info


def _check_runs(run_dirs: list[str]) -> list[str]:
    if len(run_dirs) < 2:
        raise FeatcacheError(f"ensemble: needs at least two runs (got {len(run_dirs)}); a single run is "
                             "already its own model")
    seen = {}
    for run_dir in run_dirs:
        real = os.path.realpath(run_dir)
        if real in seen:
            raise FeatcacheError(f"ensemble: {run_dir} is listed twice (as {seen[real]})")
        seen[real] = run_dir
    return [os.fspath(d) for d in run_dirs]


def _check_validation(labels: np.ndarray, class_names: list[str]) -> None:
    if len(labels) == 0:
        raise FeatcacheError("--weights fit: the validation split is empty; the weights are fitted on it "
                             "(use --weights equal)")
    present = np.unique(labels)
    if len(present) < 2:
        raise FeatcacheError(f"--weights fit: the validation split has only one class ({class_names[int(present[0])]}); "
                             "fitted weights would just favour the member most confident in it (use --weights equal)")


def ensemble(run_dirs: list[str], out: str, weights: str = "equal", report: bool = True) -> dict:
    """Average the probabilities of ``run_dirs`` with ``weights`` ("equal" or "fit"); write the
    run directory ``out``. Returns the summary printed by ``featcache ensemble --json``."""
    started = time.perf_counter()
    if weights not in WEIGHTINGS:
        raise FeatcacheError(f"--weights {weights!r}: choose from {', '.join(WEIGHTINGS)}")
    run_dirs = _check_runs(run_dirs)
    runs = [load_run(d, nested=True) for d in run_dirs]
    names = runs[0].class_names
    for run in runs[1:]:
        if run.class_names != names:
            raise FeatcacheError(f"{runs[0].run_dir} and {run.run_dir} have different classes ({', '.join(names)} vs "
                                 f"{', '.join(run.class_names)}); an ensemble needs runs of the same classes")
    warnings = []
    with CachedInputs(runs, what="an ensemble needs runs trained on the same images, labels and splits") as cache:
        labels = {s: cache.aligned.labels[cache.aligned.split(s)] for s in SPLITS}
        if weights == "fit":
            _check_validation(labels["validation"], names)
        out = rundir.prepare(out) if out else None  # after every check, before the long part
        for record, fs in zip(cache.row_sets, cache.sets):
            if rundir.feature_set_digest(fs) != record.get("digest"):
                warnings.append(f"feature set {record['name']} in {record['store']} changed since "
                                f"{cache.owner(record)} was trained on it (images added, removed or relabelled)")
        probas = {s: cache.probabilities(cache.aligned.split(s)) for s in SPLITS}
        paths = {s: cache.aligned.paths[cache.aligned.split(s)] for s in SPLITS}
    if weights == "fit":
        w, fit = fit_weights(probas["validation"], labels["validation"])
    else:
        w, fit = np.full(len(runs), 1.0 / len(runs)), None
    metrics, member_metrics = {}, [{} for _ in runs]
    for split in SPLITS:
        if not len(labels[split]):
            continue
        metrics[split] = reports.metrics(labels[split], sum(wi * p for wi, p in zip(w, probas[split])), names)
        for i, p in enumerate(probas[split]):
            member_metrics[i][split] = reports.score(labels[split], p, len(names))
    members = [{"run_dir": run.run_dir, "label": run.label, "kind": run.kind, "weight": float(wi),
                **{s: reports.summary(member_metrics[i].get(s)) for s in SPLITS}}
               for i, (run, wi) in enumerate(zip(runs, w))]
    summary = {
        "kind": "ensemble", "run_dir": out, "weights_method": weights, "weights": [float(x) for x in w],
        "members": members, **{s: reports.summary(metrics.get(s)) for s in SPLITS}, "fit": fit, "warnings": warnings,
    }
    summary["report"] = None
    if out:
        _write_run(out, runs, w, weights, fit, metrics, members)
        if report:  # from the probabilities just computed: no second pass over the members
            summary["report"] = _report(out, runs, w, labels, paths, probas, names)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def _write_run(out: str, runs, w, method: str, fit, metrics: dict, members: list[dict]) -> None:
    names = runs[0].class_names
    records = []
    for run in runs:
        for record in run.row_sets:
            if all((r["store"], r["name"]) != (record["store"], record["name"]) for r in records):
                records.append(record)
    config = {
        "kind": "ensemble", "head": "ensemble",
        "settings": {"weights": method}, "seed": None, "class_names": names,
        "members": [{"run_dir": os.path.abspath(run.run_dir), "kind": run.kind, "head": run.config["head"],
                     "label": run.label, "model_sha256": run.config["model"]["sha256"],
                     "feature_sets": [r["name"] for r in run.row_sets]} for run in runs],
        "weights": [float(x) for x in w], "fit": fit, "feature_sets": records,
        "image_root": next((run.image_root for run in runs if run.image_root), ""),
    }
    metrics = {
        "kind": "ensemble", "head": "ensemble", "feature_set": f"ensemble of {len(runs)} runs", "class_names": names,
        "weights_method": method, "weights": [float(x) for x in w], "fit": fit, **metrics, "members": members,
        "note": "validation was used to fit the weights: its metrics are optimistic; test is the honest score"
                if method == "fit" else "equal weights: nothing was fitted",
    }
    history = {}
    for prefix, split in (("", "train"), ("val_", "validation")):
        if split in metrics:
            history[prefix + "loss"] = [metrics[split]["loss"]]
            history[prefix + "accuracy"] = [metrics[split]["accuracy"]]
    title = f"ensemble of {len(runs)} runs ({method} weights)"
    rundir.write_run(out, config, metrics, history, title)  # one row of history: no curves.png
    plot_members(members, metrics, os.path.join(out, MEMBERS_PLOT), title)


def _report(out: str, runs, w, labels: dict, paths: dict, probas: dict, names: list[str]) -> str:
    from ..report.run_data import SplitPredictions
    from ..report.run_page import write_report

    shown = "test" if len(labels["test"]) else "validation"
    given = SplitPredictions(shown, list(names), paths[shown], labels[shown], sum(wi * p for wi, p in zip(w, probas[shown])),
                             next((run.image_root for run in runs if run.image_root), None),
                             f"the ensemble's {len(runs)} members, each on its cached features, weighted")
    return write_report(out, split=shown, predictions=given)["report"]


def plot_members(members: list[dict], metrics: dict, path: str, title: str) -> None:
    """Each member's weight, and its validation/test accuracy beside the ensemble's."""
    from matplotlib.figure import Figure

    labels = [f"{i + 1}. {os.path.basename(os.path.normpath(m['run_dir']))}" for i, m in enumerate(members)]
    fig = Figure(figsize=(10, 1.2 + 0.5 * (len(members) + 1)), layout="constrained")
    left, right = fig.subplots(1, 2)
    y = np.arange(len(members))
    bars = left.barh(y, [m["weight"] for m in members], color="tab:blue")
    left.bar_label(bars, fmt="%.3f", padding=2)
    left.set_yticks(y, labels)
    left.invert_yaxis()
    left.set_xlim(0, 1)
    left.set_xlabel("weight")
    rows = labels + ["ensemble"]
    y = np.arange(len(rows))
    for offset, split, colour in ((-0.2, "validation", "tab:orange"), (0.2, "test", "tab:green")):
        values = [m[split]["accuracy"] for m in members] + [metrics.get(split, {}).get("accuracy")]
        values = [v if v is not None else 0.0 for v in values]
        right.barh(y + offset, values, height=0.4, label=split, color=colour)
    right.set_yticks(y, rows)
    right.invert_yaxis()
    right.set_xlabel("accuracy")
    right.set_xlim(0, 1)
    right.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
