"""One training/evaluation harness for every head: `train` (one run, a run directory) and
`compare` (a leaderboard over heads x feature sets on the same rows, or K-fold CV)."""
from __future__ import annotations

import os
import time

import numpy as np

from ...cache.store import FeatureSet, open_store
from ...errors import FeatcacheError
from ..rows import training as data
from .. import evaluation as reports
from ..runs import run_dir as rundir
from ..rows.matched import align
from ..heads.base import Head
from ..heads.registry import HEADS, make_head

from ...cache.layout import SPLITS


def require_labelled(fs: FeatureSet, store: str) -> FeatureSet:
    """Heads learn from labels: an unlabeled feature set (a folder without classes) is refused."""
    if not fs.labelled:
        raise FeatcacheError(f"{store}: feature set {fs.name} is unlabeled (its images had no class folders); "
                             "training needs a labelled folder: one subfolder of images per class")
    return fs


def labelled_sets(s, store: str, names: list[str] | None, command: str) -> list[FeatureSet]:
    """The named feature sets (each must be labelled), or every labelled set of the store:
    unlabeled ones (features for reuse, not training) are left out unless named."""
    if names:
        return [require_labelled(s[name], store) for name in names]
    every = [s[name] for name in s.feature_set_names()]
    sets = [fs for fs in every if fs.labelled]
    if every and not sets:
        require_labelled(every[0], store)
    if not sets:
        raise FeatcacheError(f"{store}: no feature sets to {command}")
    return sets


def check_training_rows(train: data.Rows, class_names: list[str], what: str) -> None:
    """A head cannot learn from an empty split, one class, or a class it never sees."""
    if len(train) == 0:
        raise FeatcacheError(f"{what}: the training split is empty (no active rows with split 'train')")
    counts = train.class_counts(len(class_names))
    present = [class_names[i] for i in np.flatnonzero(counts)]
    if len(present) < 2:
        raise FeatcacheError(f"{what}: the training split has only one class ({', '.join(present)}); "
                             "a classifier needs at least two")
    missing = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if missing:
        raise FeatcacheError(f"{what}: the training split has no rows of class(es) {', '.join(missing)}; "
                             "the head could never predict them")


def fit_and_evaluate(head: Head, fs: FeatureSet, splits: dict[str, data.Rows], budget_mb: float,
                     run_dir: str | None = None, what: str = "", callbacks=()) -> dict:
    """Untrained check, fit, evaluation of every split: the core every command shares.
    ``callbacks``: more Keras callbacks for heads trained in epochs (search's pruning)."""
    names = fs.class_names
    k = len(names)
    train, validation = splits["train"], splits.get("validation")
    check_training_rows(train, names, what or fs.name)
    if validation is not None and len(validation) == 0:
        validation = None
    plan = data.plan(train, validation, budget_mb, int(head.config.get("batch_size", 1)))
    head.build(k, fs.feature_shape)
    head.prepare(train, plan)

    probe = validation if validation is not None else train
    untrained = reports.untrained_check(reports.score(probe.labels, head.predict_rows(probe, plan), k), k)
    untrained["split"] = probe.name

    started, cpu_started = time.perf_counter(), time.process_time()
    history = head.fit(train, validation, plan, run_dir, callbacks)
    fit_seconds = time.perf_counter() - started
    # CPU seconds of all threads: a check on wall-clock timings taken on a busy machine.
    fit_cpu_seconds = time.process_time() - cpu_started

    evaluated = {}
    for split, rows in splits.items():
        if rows is None:
            continue
        evaluated[split] = reports.metrics(rows.labels, head.predict_rows(rows, plan), names)
    val_acc = evaluated.get("validation", {}).get("accuracy")
    return {
        "plan": plan,
        "history": history,
        "untrained": untrained,
        "metrics": evaluated,
        "overfitting": reports.overfitting(history, evaluated["train"]["accuracy"], val_acc),
        "epochs_run": len(history.get("loss", [])),
        "fit_seconds": fit_seconds,
        "fit_cpu_seconds": fit_cpu_seconds,
    }


def train(store: str, feature_set: str | None = None, base: str | None = None, head: str = "dense",
          out: str | None = None, memory_budget_mb: float = data.DEFAULT_MEMORY_BUDGET_MB, report: bool = True,
          feature_sets: list[str] | None = None, **head_options) -> dict:
    """Train one head on one feature set, or (``feature_sets``, two or more names) one fused
    head on several feature sets of the same images; with ``out``, write the run directory
    and (unless ``report`` is False) its HTML report, ``out/report.html``.

    Returns the summary printed by ``featcache train --json``."""
    started = time.perf_counter()
    head_obj = make_head(head, **head_options)
    names = _fused_names(feature_sets, feature_set, base)
    with open_store(store) as s:
        if names:
            fs, splits = _fused_splits(s, names, store)
        else:
            fs = require_labelled(s.select(feature_set, base), store)
            splits = {split: data.Rows.split(fs, split) for split in SPLITS}
        run_dir = rundir.prepare(out) if out else None
        result = fit_and_evaluate(head_obj, fs, splits, memory_budget_mb, run_dir)
        if run_dir is None:
            record = None
        elif names:
            record = [rundir.feature_set_record(one, store) for one in fs.sets]
        else:
            record = rundir.feature_set_record(fs, store)
    m = result["metrics"]
    summary = {
        "kind": "fused" if names else "head",
        "head": head_obj.name,
        "feature_set": fs.name,
        **({"feature_sets": names} if names else {}),
        "untrained": {k: result["untrained"][k] for k in ("split", "n", "accuracy", "loss", "chance_accuracy",
                                                          "expected_loss", "flag", "reason")},
        **{split: reports.summary(m.get(split)) for split in SPLITS},
        "overfitting": result["overfitting"],
        "streaming": result["plan"].streaming,
        "seconds": round(result["fit_seconds"], 3),
        "cpu_seconds": round(result["fit_cpu_seconds"], 3),
        "run_dir": run_dir,
    }
    if run_dir:
        _write_run(run_dir, head_obj, record, result)
    summary["report"] = _report(run_dir) if run_dir and report else None
    summary["seconds_total"] = round(time.perf_counter() - started, 3)
    return summary


def _fused_names(feature_sets: list[str] | None, feature_set: str | None, base: str | None) -> list[str] | None:
    """The feature sets of a fused head (None: a plain one-set run)."""
    if not feature_sets:
        return None
    if feature_set or base:
        raise FeatcacheError("--feature-sets: give either --feature-sets (a fused head) or --feature-set/--base, not both")
    twice = sorted({n for n in feature_sets if feature_sets.count(n) > 1})
    if twice:
        raise FeatcacheError(f"--feature-sets: {', '.join(twice)} listed twice")
    if len(feature_sets) < 2:
        raise FeatcacheError(f"--feature-sets {feature_sets[0]}: a fused head needs two or more feature sets "
                             "(use --feature-set for one)")
    return list(feature_sets)


def _fused_splits(s, names: list[str], store: str):
    """The FusedSet of ``names`` and its rows per split, matched image by image."""
    # a missing name: "no feature set 'x' (feature sets: ...)"
    sets = [require_labelled(s[name], store) for name in names]
    aligned = align(sets, strict=True, what="a fused head needs every feature set of the same images")
    fused = data.FusedSet(sets)
    splits = {}
    for split in SPLITS:
        where = aligned.split(split)
        splits[split] = data.FusedRows.of(fused, [rows[where] for rows in aligned.rows], aligned.labels[where], split)
    return fused, splits


def _write_run(run_dir: str, head: Head, record: dict | list[dict], result: dict) -> None:
    model_path = head.save(run_dir)
    records = record if isinstance(record, list) else [record]
    shown_name = "+".join(r["name"] for r in records)
    metrics = {
        "kind": "fused" if isinstance(record, list) else "head",
        "head": head.name, "feature_set": shown_name, "class_names": records[0]["class_names"],
        "untrained": result["untrained"], **result["metrics"], "overfitting": result["overfitting"],
        "fit_seconds": result["fit_seconds"], "fit_cpu_seconds": result["fit_cpu_seconds"],
        "streaming": result["plan"].streaming,
    }
    rundir.write_run(run_dir, rundir.head_config(head, record, result["plan"].to_dict()), metrics, result["history"],
                     f"{head.name} on {shown_name}", f"{head.name}, {{split}} split\n{shown_name}", model_path)


def _report(run_dir: str) -> str:
    """The run's report.html (see report_html.write_report); the run is complete without it."""
    from ..report.run_page import write_report

    return write_report(run_dir)["report"]


# -- compare ---------------------------------------------------------------------------------


def common_rows(sets: list[FeatureSet], command: str = "compare") -> tuple[list[dict[str, np.ndarray]], int]:
    """Per feature set, the rows of each split restricted to images present in every set, so
    every leaderboard entry (compare) or trial (search) sees exactly the same images.
    Returns (rows per set, rows dropped)."""
    aligned = align(sets, strict=False, what=f"{command} needs the same images, labels and splits")
    per_set = [{split: np.sort(rows[aligned.split(split)]) for split in SPLITS} for rows in aligned.rows]
    return per_set, aligned.dropped


def _head_options(head_name: str, options: dict) -> dict:
    """The shared compare options that this head takes (e.g. --epochs only goes to dense)."""
    return {k: v for k, v in options.items() if v is not None and HEADS[head_name].accepts(k)}


def compare(store: str, heads: list[str], feature_sets: list[str] | None = None, cv: int | None = None,
            memory_budget_mb: float = data.DEFAULT_MEMORY_BUDGET_MB, out: str | None = None, report: bool = True,
            **options) -> dict:
    """Leaderboard over heads x feature sets: same rows, same metrics.

    Without ``cv``: fit on train, score validation and test; ranked by validation accuracy
    (the test split is reported, never used to rank). With ``cv=K``: StratifiedKFold on
    train+validation, mean and std of accuracy and loss over the folds; test is not touched.

    ``out``: a new folder that keeps each entry as a run directory ``out/HEAD-FEATURE_SET``
    (without ``cv``; a run directory like train's, with its report.html unless ``report`` is
    False), the result as ``out/leaderboard.json`` and, unless ``report`` is False, a page
    ``out/leaderboard.html`` linking each entry's report."""
    for name in heads:
        if name not in HEADS:
            raise FeatcacheError(f"--heads: unknown head {name!r}; choose from {', '.join(HEADS)}")
    unused = [k for k, v in options.items() if v is not None and not any(HEADS[h].accepts(k) for h in heads)]
    if unused:
        raise FeatcacheError(f"{', '.join('--' + u.replace('_', '-') for u in unused)}: no compared head takes it")
    if cv is not None and cv < 2:
        raise FeatcacheError(f"--cv {cv}: needs at least 2 folds")
    if not report and not out:
        raise FeatcacheError("--no-report: only with --out (compare writes reports only into --out)")
    started = time.perf_counter()
    if out:
        rundir.prepare(out)
    with open_store(store) as s:
        sets = labelled_sets(s, store, feature_sets, "compare")
        per_set, dropped = common_rows(sets)
        entries = []
        for fs, rows in zip(sets, per_set):
            for head_name in heads:
                opts = _head_options(head_name, options)
                entry = {"head": head_name, "feature_set": fs.name, "settings": make_head(head_name, **opts).config}
                run_dir = rundir.prepare(os.path.join(out, f"{head_name}-{fs.name}")) if out and not cv else None
                entry.update(score_head(head_name, opts, fs, rows, memory_budget_mb, cv, run_dir=run_dir, store=store))
                entries.append(entry)
        counts = {split: int(len(per_set[0][split])) for split in SPLITS}
    entries.sort(key=rank_key(bool(cv)))
    for rank, entry in enumerate(entries, 1):
        entry["rank"] = rank
    result = {"store": store, "cv": cv, "rows": counts, "rows_left_out": dropped,
              "leaderboard": entries, "seconds": round(time.perf_counter() - started, 3)}
    if out:
        _keep_leaderboard(result, out, report)
    return result


def _keep_leaderboard(result: dict, out: str, report: bool) -> None:
    """compare --out: each run's report, leaderboard.html linking them, leaderboard.json."""
    links = []
    for entry in result["leaderboard"]:
        entry["report"] = _report(entry["run_dir"]) if report and entry.get("run_dir") else None
        links.append(os.path.relpath(entry["report"], out) if entry["report"] else None)
    if report:
        from ..report.leaderboard_page import compare_leaderboard

        result["leaderboard_html"] = compare_leaderboard(result, out, links)
    result["out"] = out
    rundir.write_json(os.path.join(out, "leaderboard.json"), result)


def rank_key(cv: bool):
    """The leaderboard order of compare (and the demo): validation accuracy, then loss (CV: means)."""
    def key(entry):
        if cv:
            return (-entry["cv"]["accuracy_mean"], entry["cv"]["loss_mean"])
        val = entry["validation"]
        acc = val["accuracy"] if val["accuracy"] is not None else -1.0
        loss = val["loss"] if val["loss"] is not None else float("inf")
        return (-acc, loss)
    return key


def score_head(head_name: str, opts: dict, fs: FeatureSet, rows: dict[str, np.ndarray], budget_mb: float,
               cv: int | None = None, scored=SPLITS, views: bool = False, callbacks=None,
               run_dir: str | None = None, store: str | None = None) -> dict:
    """One head configuration on given rows (split -> row indices): fit on train and score the
    ``scored`` splits, or with ``cv=K`` K-fold cross-validation on train+validation (test
    untouched). What compare lists per entry and search records per trial.

    ``views``: training rows carry their cached augmented views, as ``train`` uses them.
    ``callbacks(fold)``: extra Keras callbacks for one fit (fold index, None without cv).
    ``run_dir`` (without cv): keep the fit as a run directory like train's (``store``: its path)."""
    extra = callbacks or (lambda fold: ())
    if cv:
        return _cross_validate(head_name, opts, fs, rows, cv, budget_mb, views, extra)
    splits = {split: _rows(fs, rows[split], split, views) for split in scored}
    head = make_head(head_name, **opts)
    result = fit_and_evaluate(head, fs, splits, budget_mb, run_dir, what=f"{fs.name} ({head_name})",
                              callbacks=extra(None))
    kept = {}
    if run_dir:
        _write_run(run_dir, head, rundir.feature_set_record(fs, store), result)
        kept = {"run_dir": run_dir}
    return {
        **kept,
        **{split: reports.summary(result["metrics"].get(split)) for split in ("validation", "test", "train") if split in scored},
        "untrained_flag": result["untrained"]["flag"],
        "overfitting": result["overfitting"]["flag"],
        "streaming": result["plan"].streaming,
        "epochs_run": result["epochs_run"],
        "seconds": round(result["fit_seconds"], 3),
    }


def _rows(fs: FeatureSet, rows: np.ndarray, split: str, views: bool) -> data.Rows:
    out = data.Rows.of(fs, rows, split)
    if views and split == "train":  # only training images have augmented views
        from ...extract.images.augment import view_rows

        out.views = view_rows(fs, out.rows)
    return out


def cv_folds(fs: FeatureSet, rows: dict[str, np.ndarray], k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """StratifiedKFold (seeded) of train+validation: [(fit rows, held-out rows)] per fold."""
    from sklearn.model_selection import StratifiedKFold

    pool = np.sort(np.concatenate([rows["train"], rows["validation"]]))
    labels = fs.column("labels")[pool]
    counts = np.bincount(labels, minlength=len(fs.class_names))
    if counts.min() < k:
        raise FeatcacheError(f"--cv {k}: class {fs.class_names[int(counts.argmin())]!r} has only {int(counts.min())} "
                             f"train+validation rows in {fs.name}; use fewer folds")
    return [(pool[fit], pool[held]) for fit, held in StratifiedKFold(k, shuffle=True, random_state=seed).split(pool, labels)]


def _cross_validate(head_name: str, opts: dict, fs: FeatureSet, rows: dict, k: int, budget_mb: float,
                    views: bool = False, callbacks=lambda fold: ()) -> dict:
    folds = []
    seed = int(opts.get("seed", 0) or 0)
    for i, (fit_rows, held_rows) in enumerate(cv_folds(fs, rows, k, seed)):
        splits = {"train": _rows(fs, fit_rows, "train", views), "validation": data.Rows.of(fs, held_rows, "validation")}
        result = fit_and_evaluate(make_head(head_name, **opts), fs, splits, budget_mb,
                                  what=f"{fs.name} ({head_name}, fold {i + 1})", callbacks=callbacks(i))
        folds.append({**reports.summary(result["metrics"]["validation"]), "epochs_run": result["epochs_run"],
                      "seconds": round(result["fit_seconds"], 3)})
    acc = np.array([f["accuracy"] for f in folds])
    loss = np.array([f["loss"] for f in folds])
    return {"cv": {"k": k, "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
                   "loss_mean": float(loss.mean()), "loss_std": float(loss.std()), "folds": folds},
            "seconds": round(sum(f["seconds"] for f in folds), 3)}
