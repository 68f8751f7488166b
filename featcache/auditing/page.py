"""audit.html: what the audit found, self-contained like report.html (thumbnails inlined)."""
from __future__ import annotations

import time

from ..classify.report.figures import thumbnail_jpeg
from ..classify.report.page import esc, img, notes_html, num, page, table, write_html

THUMB = 128
MAX_SHOWN = 60  # cards per section; the CSV files hold every row
MAX_SHOWN_PER_GROUP = 12  # members of one duplicate group (a million look-alikes can be one group)


def _card(image_root: str, path: str, caption: str, cls: str = "wrong") -> str:
    data, reason = thumbnail_jpeg(image_root, path, THUMB) if image_root else (None, "no image folder recorded")
    picture = img(data, "image/jpeg", path, cls="") if data else f'<div class="noimg">{esc(reason)}</div>'
    return (f'<figure class="card {cls}">{picture}<figcaption>{caption}'
            f'<div class="path">{esc(path)}</div></figcaption></figure>')


def rule_text(rule: dict) -> str:
    """The near-duplicate rule in words (see job.near_duplicate_rule)."""
    text = f"cosine similarity >= {rule['threshold']:g}"
    if rule.get("floor") is not None:
        text += (f", or mutual nearest neighbours >= {rule['floor']:g} that stand out by {rule['gap']:g} "
                 "from the next best")
    return text


def write_page(path: str, result: dict, image_root: str) -> int:
    started = time.perf_counter()
    sections = [f"<h1>Audit of {esc(result['feature_set'])}</h1>",
                f'<p class="sub">{num(result["rows"])} rows of {esc(result["store"])}; near duplicates: '
                f'{esc(rule_text(result["settings"]["near_duplicates"]))}</p>', notes_html(result["notes"])]
    share = result["leak_share"]
    summary = [["label issues", num(len(result["label_issues"])) if result["labelled"] else "– (unlabelled)"],
               ["duplicate groups", num(len(result["duplicates"]))],
               ["leaks (groups across train and validation/test)", num(len(result["leaks"]))],
               ["validation/test images with a twin in train",
                f'{num(share["with_a_twin_in_train"])} of {num(share["held_out_images"])}'],
               ["outliers", num(len(result["outliers"]))]]
    sections.append("<section><h2>Summary</h2>" + table(["what", "found"], summary, cls="facts") + "</section>")
    if result["per_class"]:
        rows = [[esc(c["class"]), num(c["rows"]), num(c["train"]), num(c["validation"]), num(c["test"]),
                 num(c["label_issues"]), num(c["out_of_fold_accuracy"])] for c in result["per_class"]]
        pairs = [[esc(p["given"]), esc(p["predicted"]), num(p["rows"])] for p in result["confused_pairs"]]
        sections.append("<section><h2>Per class</h2>" + table(
            ["class", "rows", "train", "validation", "test", "label issues", "out-of-fold accuracy"], rows, {1, 2, 3, 4, 5, 6})
            + "<h3>Pairs the out-of-fold model confuses</h3>"
            + table(["given", "predicted", "rows"], pairs, {2}) + "</section>")
    if result["label_issues"]:
        cards = [_card(image_root, i["path"], f'given <span class="true">{esc(i["given"])}</span>, suggested '
                       f'<span class="pred">{esc(i["suggested"])}</span> <span class="p">p(given) {i["score"]:.3g}</span>')
                 for i in result["label_issues"][:MAX_SHOWN]]
        sections.append("<section><h2>Label issues (worst first)</h2><div class=gallery>" + "".join(cards) + "</div></section>")
    for title, key in (("Leaks across splits", "leaks"), ("Duplicate groups", "duplicates")):
        groups = result[key][:MAX_SHOWN]
        if not groups:
            continue
        blocks = []
        for g in groups:
            shown = list(zip(g["paths"], g["splits"]))[:MAX_SHOWN_PER_GROUP]
            cards = [_card(image_root, p, f'{esc(s)}{" (exact)" if g.get("exact") else ""}', "right" if i == 0 else "wrong")
                     for i, (p, s) in enumerate(shown)]
            more = len(g["paths"]) - len(shown)
            blocks.append(f'<h3>similarity {g["similarity"]:.4f}, {len(g["paths"])} images'
                          f'{f" ({more} more in the CSV files)" if more else ""}</h3><div class=gallery>{"".join(cards)}</div>')
        sections.append(f"<section><h2>{title}</h2>{''.join(blocks)}</section>")
    if result["outliers"]:
        cards = [_card(image_root, o["path"], f'score <span class="p">{o["score"]:.3f}</span>')
                 for o in result["outliers"][:MAX_SHOWN]]
        sections.append("<section><h2>Outliers (most isolated first)</h2><div class=gallery>" + "".join(cards)
                        + "</div></section>")
    return write_html(path, page(f"featcache audit: {result['feature_set']}", "".join(sections), started))
