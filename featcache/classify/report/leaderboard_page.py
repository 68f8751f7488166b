"""Leaderboard pages: a table of runs, each row linking its run's report (see :mod:`.html_page`).

`featcache compare --out` writes one; anything that ranks runs (a search's trials) can render
its own with :func:`render_leaderboard`.
"""
from __future__ import annotations

import os
import time
from urllib.parse import quote

import numpy as np

from .page import esc, notes_html, num, page, table, write_html


def render_leaderboard(title: str, columns: list[tuple[str, str]], rows: list[dict], links: list[str | None],
                       notes: list[str] = (), facts: list[tuple[str, str]] = (), link_label: str = "report") -> str:
    """One HTML page: a table of ``rows`` (dicts; ``columns`` = [(key, header)] or [(key, header,
    format spec of its numbers)]; floats default to 4 decimals) with, per row, a link to
    ``links[i]`` (a path relative to the page, e.g. a run's report.html) or none."""
    if len(links) != len(rows):
        raise ValueError("one link (or None) per row")
    started = time.perf_counter()
    columns = [(c[0], c[1], c[2] if len(c) > 2 else ".4f") for c in columns]
    numeric = {i for i, (key, _, _) in enumerate(columns)
               if any(isinstance(r.get(key), (int, float, np.number)) and not isinstance(r.get(key), bool) for r in rows)}
    table_rows = []
    for row, link in zip(rows, links):
        cells = [num(row.get(key), spec) for key, _, spec in columns]
        cells.append(f'<a href="{esc(quote(link))}">{esc(link_label)}</a>' if link else "–")
        table_rows.append(cells)
    body = [f"<h1>{esc(title)}</h1>", notes_html(list(notes))]
    if facts:
        body.append('<section><table class="facts">' + "".join(
            f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts) + "</table></section>")
    body.append("<section>" + table([h for _, h, _ in columns] + [link_label], table_rows, numeric) + "</section>")
    return page(title, "".join(body), started)


def write_leaderboard(path: str, title: str, columns, rows, links, notes=(), facts=(), link_label="report") -> str:
    write_html(path, render_leaderboard(title, columns, rows, links, notes, facts, link_label))
    return path


def compare_leaderboard(result: dict, out_dir: str, links: list[str | None]) -> str:
    """The leaderboard page of ``featcache compare --out``: OUT_DIR/leaderboard.html."""
    cv = result.get("cv")
    rows, columns = [], [("rank", "#"), ("head", "head"), ("feature_set", "feature set")]
    if cv:
        columns += [("cv_accuracy", f"cv{cv} accuracy"), ("cv_accuracy_std", "±"),
                    ("cv_loss", f"cv{cv} loss"), ("cv_loss_std", "±"), ("seconds", "seconds", ".1f")]
    else:
        columns += [("val_accuracy", "val acc"), ("val_loss", "val loss"), ("test_accuracy", "test acc"),
                    ("test_loss", "test loss"), ("overfitting", "overfitting"), ("seconds", "seconds", ".1f")]
    for e in result["leaderboard"]:
        row = {"rank": e["rank"], "head": e["head"], "feature_set": e["feature_set"], "seconds": e["seconds"]}
        if cv:
            c = e["cv"]
            row.update(cv_accuracy=c["accuracy_mean"], cv_accuracy_std=c["accuracy_std"], cv_loss=c["loss_mean"],
                       cv_loss_std=c["loss_std"])
        else:
            row.update(val_accuracy=e["validation"]["accuracy"], val_loss=e["validation"]["loss"],
                       test_accuracy=e["test"]["accuracy"], test_loss=e["test"]["loss"], overfitting=e["overfitting"])
        rows.append(row)
    counts = result["rows"]
    facts = [("store", os.path.abspath(result["store"])),
             ("images", f"train {counts['train']:,}, validation {counts['validation']:,}, test {counts['test']:,}"),
             ("ranked by", f"mean accuracy over {cv} folds of train+validation" if cv
              else "validation accuracy (test is reported, never used to rank)")]
    notes = []
    if result.get("rows_left_out"):
        notes.append(f"{result['rows_left_out']} rows not present in every feature set were left out")
    if cv:
        notes.append("cross-validation trains one model per fold: there is no single run to report per entry")
    path = os.path.join(out_dir, "leaderboard.html")
    return write_leaderboard(path, f"featcache compare: {os.path.basename(result['store'])}", columns, rows, links,
                             notes, facts)
