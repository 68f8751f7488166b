"""``featcache verify STORE``: read a store end to end and say what is damaged, down to rows."""
from __future__ import annotations

import os
import shlex
import time

from .scan import scan, scannable, summary


def verify(store: str) -> dict:
    """Read every feature set of ``store`` completely: every chunk's checksum, and the
    consistency of the columns (lengths, text offsets, counters, labels within the class names,
    splits, active flags, digests). Safe beside a running writer (it checks the rows committed
    when it opened the store).

    ``ok`` is True when nothing is damaged. Feature sets written before featcache stored
    checksums are ``unchecked``: their columns' consistency is checked, their numbers cannot
    be; they count as ok."""
    store = scannable(store)
    started = time.perf_counter()
    result = scan(store)
    sets = [summary(s) for s in result.sets]
    seconds = time.perf_counter() - started
    nbytes = os.path.getsize(store)
    return {
        "store": store,
        "ok": not result.damaged,
        "damage": [d.to_dict() for d in result.damage],
        "feature_sets": sets,
        "unchecked": [s["feature_set"] for s in sets if s["status"] == "unchecked"],
        "left_by_killed_run": result.torn_ok,
        "bytes": nbytes,
        "seconds": round(seconds, 3),
        "repair": None if not result.damaged else f"featcache repair {shlex.quote(store)}",
    }


def format_report(result: dict) -> list[str]:
    """Lines for a person: one per feature set, then one per damage."""
    lines = []
    for d in result["damage"]:
        lines.append(f"{result['store']}: damaged {_damage_text(d)}")
    for s in result["feature_sets"]:
        head = f"{s['feature_set']}: {s['status']}"
        if s["unreadable"]:
            lines.append(f"{head}: nothing can be read ({s['unreadable']})")
            continue
        what = f"{s['rows']} rows"
        if s["status"] == "damaged":
            what += f", {s['rows_lost']} lost" + (f", {s['rows_set_aside']} set aside" if s["rows_set_aside"] else "")
        elif s["status"] == "unchecked":
            what += "; written before featcache stored checksums: its numbers cannot be checked"
        lines.append(f"{head} ({what}{', merged' if s['merged'] else ''})")
        for d in s["damage"]:
            lines.append(f"  damaged {_damage_text(d)}")
        for d in s["torn"]:
            lines.append(f"  note: {_damage_text(d)}")
    if not result["feature_sets"] and not result["damage"]:
        lines.append(f"{result['store']}: no feature sets")
    if result["left_by_killed_run"]:
        lines.append("note: left by a killed featcache run; the next extract of it resumes and rewrites what it tore")
    return lines


def _damage_text(d: dict) -> str:
    rows = "" if d["rows"] is None else (f", row {d['rows'][0]}" if d["rows"][0] == d["rows"][1]
                                         else f", rows {d['rows'][0]}-{d['rows'][1]}")
    where = f" (in {d['file']})" if d.get("file") else ""
    return f"{d['what']}{rows}{where}: {d['reason']}"
