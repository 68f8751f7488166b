"""The HTML page every featcache report shares: one self-contained file.

Pictures are inlined as data: URIs and the styles are inline; there is no script, and a
Content-Security-Policy forbids any request, so a page opens from disk in any browser, offline,
and can be mailed around. Every string that comes from a file (paths, class names, settings)
goes through :func:`esc`.
"""
from __future__ import annotations

import html
import os
import time
from string import Template

import numpy as np

from ...version import __version__
from ...errors import FeatcacheError
from . import figures as report_figures

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="featcache $version">
<title>$title</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 28px 40px; }
h1 { font-size: 22px; margin: 6px 0 2px; }
h2 { font-size: 17px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d5d9e0; }
.sub { color: #5b6475; margin: 0 0 12px; overflow-wrap: anywhere; }
section { background: #fff; border: 1px solid #e1e4ea; border-radius: 8px; padding: 4px 18px 16px; margin-top: 16px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eceef2; text-align: left; vertical-align: top; }
th { background: #f1f3f6; font-weight: 600; }
td.num, th.num { text-align: right; }
table.facts th { background: none; width: 190px; color: #5b6475; font-weight: 500; }
table.facts td { overflow-wrap: anywhere; }
.notes { background: #fff7e0; border: 1px solid #f0d48a; border-radius: 8px; padding: 8px 16px; margin-top: 16px; }
.notes li { margin: 3px 0; }
.flag { color: #b3261e; font-weight: 600; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
img.plot { max-width: 100%; height: auto; border: 1px solid #eceef2; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
figure.card { margin: 0; background: #fff; border: 1px solid #d5d9e0; border-top: 4px solid #888; border-radius: 6px; padding: 6px; font-size: 12px; }
figure.wrong { border-top-color: #d93025; }
figure.right { border-top-color: #1e8e3e; }
figure.card img, figure.card .noimg { display: block; width: 100%; height: 128px; object-fit: contain; background: #f1f3f6; }
figure.card .noimg { color: #5b6475; font-size: 11px; overflow: hidden; padding: 4px; box-sizing: border-box; }
figcaption { margin-top: 4px; }
.path { color: #5b6475; word-break: break-all; font-size: 11px; }
.pred { color: #b3261e; font-weight: 600; }
.true { font-weight: 600; }
.p { font-variant-numeric: tabular-nums; }
h3 { font-size: 14px; margin: 14px 0 6px; }
details summary { cursor: pointer; color: #1a56c5; margin: 8px 0; }
footer { color: #5b6475; font-size: 12px; margin-top: 24px; }
a { color: #1a56c5; }
</style>
</head>
<body><main>
$body
<footer>Written by featcache $version on $written in $seconds s. Self-contained: no script, no network request.</footer>
</main></body>
</html>
""")


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def num(value, spec=".4f") -> str:
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return format(float(value), spec)
    return esc(value)


def img(data: bytes | None, mime: str, alt: str, cls: str = "plot", extra: str = "") -> str:
    if not data:
        return ""
    return f'<img class="{cls}" src="{report_figures.data_uri(data, mime)}" alt="{esc(alt)}"{extra}>'


def table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset(), cls: str = "") -> str:
    """``rows`` are already-escaped cell strings."""
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{esc(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{c}</td>' for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    return f'<table{f" class={cls}" if cls else ""}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def notes_html(notes: list[str]) -> str:
    if not notes:
        return ""
    return '<div class="notes"><b>Note</b><ul>' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul></div>"


def page(title: str, body: str, started: float) -> str:
    return PAGE.substitute(version=esc(__version__), title=esc(title), body=body,
                           written=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           seconds=f"{time.perf_counter() - started:.1f}")


def write_html(path: str, text: str) -> int:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FeatcacheError(f"{path}: folder {parent} does not exist")
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise FeatcacheError(f"{path}: cannot write the report ({exc.strerror or exc})") from None
    return len(text.encode("utf-8"))
