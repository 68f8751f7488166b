"""`featcache report`: one self-contained HTML page of a run (see :mod:`.html_page`).

The page holds the run's key facts, metrics per split, training curves, confusion matrix and
per-class precision/recall/F1 (from the run directory), the images it gets wrong and its most
confident right answers (thumbnails from the recorded image folder), and a map of the split's
cached features (PCA then t-SNE). What cannot be had is said on the page instead (a store that
moved: the recorded metrics only; images that moved: paths instead of thumbnails).
"""
from __future__ import annotations

import os
import time

import numpy as np

from ...cache.layout import SPLITS
from ...errors import FeatcacheError
from . import run_data as report_data, figures as report_figures
from ..runs import run_dir as rundir
from ..runs.kinds import kind_of
from .page import esc, img, notes_html, num, page, table, write_html

REPORT = "report.html"
DEFAULT_MAX_IMAGES = 100
RIGHT_PER_CLASS = 4  # most confident right answers shown per class
THUMB_SIDE = 128
MISTAKE_LIST_MAX = 5000  # mistakes past the thumbnails are listed as text, up to this many


# -- the run report --------------------------------------------------------------------------


def choose_split(metrics: dict, config: dict, split: str | None) -> str:
    """The requested split, or test when it has images, else validation."""
    counts = {s: (metrics.get(s) or {}).get("n") or rundir.feature_records(config)[0].get("rows", {}).get(s, 0)
              for s in SPLITS}
    if split is None:
        return "test" if counts["test"] else "validation"
    if split not in SPLITS:
        raise FeatcacheError(f"--split {split!r}: choose from {', '.join(SPLITS)}")
    return split


def write_report(run_dir: str, out: str | None = None, split: str | None = None,
                 max_images: int = DEFAULT_MAX_IMAGES, seed: int = 0,
                 predictions: report_data.SplitPredictions | None = None) -> dict:
    """Write the HTML report of ``run_dir`` (default ``RUN_DIR/report.html``, replaced if there).

    ``predictions``: the split's per-image results when the caller already has them (the end of
    ``finetune``), else :func:`report_data.split_predictions` computes them. Returns what
    ``featcache report --json`` prints."""
    started = time.perf_counter()
    if max_images < 0:
        raise FeatcacheError(f"--max-images {max_images}: must be 0 or more")
    if not os.path.isdir(run_dir):
        raise FeatcacheError(f"{run_dir}: no such run directory")
    config = rundir.read_config(run_dir)
    notes: list[str] = []
    try:
        metrics = report_data.read_metrics(run_dir)
    except FeatcacheError as exc:
        metrics = {}
        notes.append(str(exc))
    split = choose_split(metrics, config, split)
    out = os.fspath(out) if out else os.path.join(run_dir, REPORT)
    names = list(rundir.class_names(config))

    seconds = {}
    clock = time.perf_counter()
    if predictions is None:
        try:
            predictions = report_data.split_predictions(run_dir, split)
        except FeatcacheError as exc:
            notes.append(f"no per-image results: {exc}; the report shows the metrics recorded in the run")
    seconds["predictions"], clock = time.perf_counter() - clock, time.perf_counter()
    if predictions is not None:
        notes += predictions.notes
        n_recorded = (metrics.get(split) or {}).get("n")
        if n_recorded is not None and n_recorded != len(predictions):
            notes.append(f"the {split} split has {len(predictions)} images now, the run's metrics counted {n_recorded}")
    mistakes_html, gallery = _mistakes_section(predictions, max_images, notes) if predictions is not None else ("", {})
    seconds["thumbnails"], clock = time.perf_counter() - clock, time.perf_counter()
    map_html, map_info = _map_section(config, predictions, seed, notes) if predictions is not None else ("", {})
    seconds["map"], clock = time.perf_counter() - clock, time.perf_counter()
    metrics_html = _metrics_section(metrics, split, names, run_dir)
    seconds["plots"] = time.perf_counter() - clock

    head = config["head"]
    title = _title(config)
    body = "".join([
        f"<h1>{esc(title)}</h1>",
        f'<p class="sub">featcache report of {esc(os.path.abspath(run_dir))} · {esc(split)} split</p>',
        notes_html(notes),
        _facts_section(config, metrics),
        metrics_html,
        mistakes_html,
        map_html,
    ])
    size = write_html(out, page(f"{title}: featcache report", body, started))
    n = len(predictions) if predictions is not None else None
    return {
        "report": out, "run_dir": run_dir, "kind": rundir.run_kind(config), "head": head,
        "feature_set": "+".join(r["name"] for r in rundir.feature_records(config)), "split": split,
        "images": n, "per_image": predictions is not None,
        "mistakes": int(np.sum(predictions.predicted != predictions.labels)) if n is not None else None,
        "mistake_thumbnails": None, "right_thumbnails": None, "map_points": None, "map_method": None,
        **gallery, **map_info, "notes": notes, "bytes": size,
        "stage_seconds": {k: round(v, 3) for k, v in seconds.items()}, "seconds": round(time.perf_counter() - started, 3),
    }


def _title(config: dict) -> str:
    return kind_of(config).title(config)


def _base_facts(record: dict, label: str = "") -> list[tuple[str, str]]:
    key = record.get("key", {})
    return [
        (f"feature set{label}", esc(record["name"])),
        (f"base{label}", esc(f"{key.get('backbone')} at {key.get('input_size')} px, layer {key.get('layer')}, "
                             f"pooling {key.get('pooling')}, {key.get('dtype')}, precision {key.get('precision')}")),
        (f"key{label}", esc(", ".join(f"{k}={v}" for k, v in key.items()))),
        (f"feature shape{label}", esc(" x ".join(map(str, record.get("feature_shape", []))))),
    ]


def _facts_section(config: dict, metrics: dict) -> str:
    records = rundir.feature_records(config)
    record = records[0]
    rows = record.get("rows", {})
    settings = config.get("settings", {})
    model_facts = kind_of(config).model_facts(config)
    if model_facts is not None:
        described = [(name, esc(text).replace("\n", "<br>")) for name, text in model_facts]
    else:
        several = len(records) > 1
        described = [fact for i, r in enumerate(records) for fact in _base_facts(r, f" {i + 1}" if several else "")]
    facts = [
        ("kind", esc(rundir.run_kind(config))),
        ("head", esc(config["head"])),
        ("settings", esc(", ".join(f"{k}={v}" for k, v in settings.items() if v is not None))),
        *described,
        ("classes", esc(", ".join(rundir.class_names(config)))),
        ("images per split", esc(", ".join(f"{s} {rows.get(s, 0):,}" for s in SPLITS))),
        ("store", esc(", ".join(dict.fromkeys(r.get("store", "") for r in records)))),
        ("image folder", esc(config.get("image_root") or record.get("image_root") or "")),
        ("training time", esc(_seconds(metrics))),
        ("created", esc(config.get("created", "") + (f" (featcache {config['featcache_version']})"
                                                     if config.get("featcache_version") else ""))),
    ]
    if "model" in config:
        facts.append(("model", esc(f"{config['model']['file']} sha256 {config['model'].get('sha256', '')}")))
    if config.get("stage_two_run"):
        facts.insert(2, ("fine-tuned from", esc(config["stage_two_run"])))
        facts.insert(3, ("trainable layers", esc(", ".join(config.get("trainable_layers", [])))))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    return f'<section><h2>The run</h2><table class="facts">{body}</table></section>'


def _seconds(metrics: dict) -> str:
    if metrics.get("fit_seconds") is None:
        return "not recorded"
    text = f"{metrics['fit_seconds']:.1f} s"
    if metrics.get("fit_cpu_seconds") is not None:
        text += f" ({metrics['fit_cpu_seconds']:.1f} CPU s)"
    if metrics.get("data_seconds") is not None:
        text += f", data {metrics['data_seconds']:.1f} s"
    return text


def _metrics_section(metrics: dict, split: str, names: list[str], run_dir: str) -> str:
    rows = []
    for label, key in (("untrained", "untrained"), ("before fine-tuning (test)", None),
                       ("train", "train"), ("validation", "validation"), ("test", "test")):
        m = metrics.get(key) if key else (metrics.get("before") or {}).get("test")
        if m:
            if key == "untrained" and m.get("split"):
                label = f"untrained ({m['split']})"
            rows.append([esc(label), num(m.get("n")), num(m.get("accuracy")), num(m.get("loss"))])
    parts = ["<section><h2>Metrics</h2>",
             table(["split", "images", "accuracy", "log loss"], rows, {1, 2, 3}) if rows else "<p>No metrics recorded.</p>"]
    flags = [(name, (metrics.get(name) or {}).get("reason")) for name in ("untrained", "overfitting")
             if (metrics.get(name) or {}).get("flag")]
    for name, reason in flags:
        parts.append(f'<p class="flag">{esc(name)}: {esc(reason)}</p>')
    curves = report_figures.curves_png(report_data.read_history(run_dir), f"{metrics.get('head', '')} training")
    if curves:
        parts.append("<h3>Training curves</h3>" + img(curves, "image/png", "loss and accuracy per epoch"))
    m = metrics.get(split) or {}
    if m.get("confusion_matrix") is not None:
        confusion = report_figures.confusion_png(m["confusion_matrix"], names, f"{split} split (rows: true class)")
        per_class = m.get("per_class") or {}
        table_rows = [[esc(c), num(per_class[c]["precision"]), num(per_class[c]["recall"]),
                       num(per_class[c]["f1-score"]), num(int(per_class[c]["support"]))]
                      for c in [*names, "macro avg", "weighted avg"] if isinstance(per_class.get(c), dict)]
        parts.append(f"<h3>{esc(split.capitalize())} split: confusion matrix and per-class scores</h3>"
                     '<div class="row"><div>' + img(confusion, "image/png", "confusion matrix") + "</div><div>"
                     + table(["class", "precision", "recall", "F1", "images"], table_rows, {1, 2, 3, 4}) + "</div></div>")
    parts.append("</section>")
    return "".join(parts)


def _card(kind: str, path: str, true: str, predicted: str, p_pred: float, p_true: float, thumb: bytes | None,
          reason: str) -> str:
    picture = (img(thumb, "image/jpeg", path, cls="thumb") if thumb
               else f'<div class="noimg">{esc(reason or "no image")}</div>')
    if kind == "wrong":
        caption = (f'<span class="true">{esc(true)}</span> → <span class="pred">{esc(predicted)}</span> '
                   f'<span class="p">{p_pred:.3f}</span><br>p({esc(true)}) <span class="p">{p_true:.3f}</span>')
    else:
        caption = f'<span class="true">{esc(true)}</span> <span class="p">{p_pred:.3f}</span>'
    return (f'<figure class="card {kind}" data-path="{esc(path)}" data-true="{esc(true)}" '
            f'data-predicted="{esc(predicted)}" data-probability="{p_pred:.6f}">{picture}'
            f'<figcaption>{caption}<br><span class="path">{esc(path)}</span></figcaption></figure>')


def _listing(indices, pred: report_data.SplitPredictions) -> str:
    names, predicted = pred.class_names, pred.predicted
    rows = [[esc(pred.paths[i]), esc(names[pred.labels[i]]), esc(names[predicted[i]]),
             f"{pred.proba[i, predicted[i]]:.4f}"] for i in indices]
    return table(["path", "true class", "predicted", "probability"], rows, {3})


def _mistakes_section(pred: report_data.SplitPredictions, max_images: int, notes: list[str]) -> tuple[str, dict]:
    names, predicted, labels = pred.class_names, pred.predicted, pred.labels
    n = len(pred)
    confidence = pred.proba[np.arange(n), predicted] if n else np.zeros(0)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]  # most confident mistakes first
    root = pred.image_root
    have_images = bool(root) and os.path.isdir(root)
    if not have_images:
        notes.append(f"the image folder {root or '(not recorded)'} is gone: images are listed by path, without thumbnails")
    unreadable = []

    def cards(indices, kind):
        out = []
        for i in indices:
            thumb, reason = report_figures.thumbnail_jpeg(root, pred.paths[i], THUMB_SIDE)
            if thumb is None:
                unreadable.append(pred.paths[i])
            out.append(_card(kind, pred.paths[i], names[labels[i]], names[predicted[i]], float(confidence[i]),
                             float(pred.proba[i, labels[i]]), thumb, reason))
        return "".join(out)

    shown = wrong[:max_images] if have_images else wrong[:0]
    parts = [f"<section><h2>Mistakes: {len(wrong):,} of {n:,} {esc(pred.split)} images</h2>",
             f'<p class="sub">Per-image results: {esc(pred.source)}. Sorted by the probability of the wrong '
             "class, most confident first.</p>"]
    if len(shown):
        parts.append(f'<div class="gallery mistakes">{cards(shown, "wrong")}</div>')
    rest = wrong[len(shown):]
    if len(rest):
        listed = rest[:MISTAKE_LIST_MAX]
        what = f"{len(rest):,} more mistakes" if len(shown) else f"the {len(rest):,} mistakes"
        more = f" (the first {len(listed):,} listed)" if len(listed) < len(rest) else ""
        parts.append(f"<details{'' if len(shown) else ' open'}><summary>{what}{more}</summary>"
                     f"{_listing(listed, pred)}</details>")
    if not len(wrong):
        parts.append("<p>No mistakes on this split.</p>")

    per_class = min(RIGHT_PER_CLASS, max_images // max(1, len(names))) if max_images else 0
    right_total = 0
    if have_images and per_class:
        parts.append("<h3>Most confident right answers, per class</h3>")
        for c, name in enumerate(names):
            right = np.flatnonzero((labels == c) & (predicted == c))
            best = right[np.argsort(-confidence[right], kind="stable")][:per_class]
            right_total += len(best)
            parts.append(f'<div class="gallery right">{cards(best, "right")}</div>' if len(best)
                         else f"<p>{esc(name)}: no right answers.</p>")
    parts.append("</section>")
    if unreadable:
        notes.append(f"{len(unreadable)} images could not be read for thumbnails (first: {unreadable[0]})")
    return "".join(parts), {"mistake_thumbnails": int(len(shown)), "right_thumbnails": right_total}


def _map_section(config: dict, pred: report_data.SplitPredictions, seed: int, notes: list[str]) -> tuple[str, dict]:
    if len(pred) == 0:
        return "", {"map_points": 0}
    try:
        features, index, sample_note = report_data.map_features(config, pred, seed)
    except FeatcacheError as exc:
        notes.append(f"no map of the features: {exc}")
        return "", {"map_points": 0}
    coords, method = report_figures.embed_2d(features, seed)
    labels, predicted = pred.labels[index], pred.predicted[index]
    picture = report_figures.map_png(coords, labels, predicted, pred.class_names,
                                     f"{pred.split} split: {len(coords):,} images")
    what = "the stage-two cached features (before fine-tuning)" if config["head"] == "finetune" else "the cached features the head was trained on"
    caption = (f"Each point is one image of the {esc(pred.split)} split ({len(coords):,} points{', ' + esc(sample_note) if sample_note else ''}), "
               f"placed by {esc(method)}; {what}. Colour: true class; X: misclassified.")
    return ("<section><h2>Map of the features</h2>"
            f'<p class="sub">{caption}</p>'
            + img(picture, "image/png", "map of the features", extra=f' data-points="{len(coords)}"')
            + "</section>"), {"map_points": int(len(coords)), "map_method": method}
