"""Runs damage cases for tests/test_damage.py in a process of its own, so that the test can bound
each case's time (a hang) and survive a crash of HDF5 (a segfault) in one of them.

Usage: python damage_worker.py WORKDIR CASE_ID... ; WORKDIR holds images/, clean.h5 and
cases.json (written by the test). For each case it prints a line {"start": id}, then
{"done": id, "problems": [...], "seconds": {command: s}, ...}. A case damages a copy of the
clean store, runs featcache commands on it in-process (click's CliRunner) and checks:

- every command exits 0 with the clean store's result, or 1 with one line `error: ...` that
  names the store;
- verify reports every damaged row that was written (for damage inside a chunk: the rows the
  chunk holds), and when it says the store is fine, the store reads exactly like the clean one;
- repair then extract gives rows equal to the clean run's, and extract recomputes exactly the
  rows repair could not keep.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from click.testing import CliRunner  # noqa: E402

from conftest import rows_by_digest  # noqa: E402
from featcache.cli import cli  # noqa: E402

EXTRACT = ["--base", "pixels", "--size", "32", "--batch-size", "8", "--no-progress", "--json"]


def invoke(*args):
    started = time.perf_counter()
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result, time.perf_counter() - started


def damage(store: str, case: dict) -> None:
    kind = case["kind"]
    if kind in ("flip", "zero"):
        with open(store, "r+b") as fh:
            fh.seek(case["offset"])
            if kind == "flip":
                byte = fh.read(1)[0]
                fh.seek(case["offset"])
                fh.write(bytes([byte ^ (1 << case["bit"])]))
            else:
                fh.write(bytes(case["length"]))
    elif kind == "truncate":
        os.truncate(store, case["offset"])
    else:  # another program edits the file with h5py
        with h5py.File(store, "r+", libver="latest") as f:
            group = f["feature_sets"][case["feature_set"]]
            if kind == "delete_set":
                del f["feature_sets"][case["feature_set"]]
            elif kind == "delete_dataset":
                del group[case["dataset"]]
            elif kind == "delete_attr":
                del group.attrs[case["attr"]]


def same_rows(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[d][1:] == b[d][1:] and np.array_equal(a[d][0], b[d][0]) for d in a)


def reported_rows(verify: dict) -> set[int] | None:
    """Rows verify says are lost or set aside; None: it says the whole feature set is unreadable."""
    rows: set[int] = set()
    for fs in verify["feature_sets"]:
        if fs["unreadable"]:
            return None
        for d in fs["damage"]:
            if d["rows"] is not None:
                rows.update(range(d["rows"][0], d["rows"][1] + 1))
    return rows


class Case:
    def __init__(self, work: str, case: dict, clean: dict):
        self.work, self.case, self.clean = work, case, clean
        self.dir = os.path.join(work, f"case{case['id']}")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.store = os.path.join(self.dir, "s.h5")
        shutil.copy(os.path.join(work, "clean.h5"), self.store)
        damage(self.store, case)
        self.problems: list[str] = []
        self.seconds: dict[str, float] = {}
        self.exits: dict[str, int] = {}

    def run(self, name: str, *args):
        result, seconds = invoke(*args)
        self.seconds[name] = round(seconds, 3)
        self.exits[name] = result.exit_code
        if result.exit_code not in (0, 1) or result.exception and not isinstance(result.exception, SystemExit):
            self.problems.append(f"{name}: exit {result.exit_code} {result.exception!r}: {result.output[-300:]}")
            return None
        if result.exit_code == 1:
            lines = result.stderr.strip().splitlines()
            if name == "search":  # its progress lines (trials run before the damage was read) come first
                lines = [line for line in lines if line.startswith("error: ") or not line.startswith(("trial ", "testing "))]
            if len(lines) != 1 or not lines[0].startswith("error: ") or "s.h5" not in lines[0]:
                self.problems.append(f"{name}: exit 1 without one error line naming the store: {result.stderr!r}")
            return None
        return json.loads(result.stdout) if "--json" in args else result.stdout

    def expect_clean(self, name: str, got, want) -> None:
        if got is not None and got != want:
            self.problems.append(f"{name}: exit 0 with another result than the clean store's: {got!r} != {want!r}")

    def check(self) -> dict:
        c, clean, store = self.case, self.clean, self.store
        if c["kind"] in ("flip", "zero") and c["offset"] < 8:
            return self.check_unrecognisable()
        info = self.run("info", "info", store, "--json")
        if info is not None:
            info["store"] = "clean.h5"
        deleted = c["kind"] == "delete_set"
        self.expect_clean("info", info, {"store": "clean.h5", "feature_sets": []} if deleted else clean["info"])
        verify = self.run("verify", "verify", store, "--json")
        if verify is None:  # damaged: exit 1, and the report is on stdout
            verify = json.loads(CliRunner().invoke(cli, ["verify", store, "--json"]).stdout)
        if c["full"]:
            run_dir = os.path.join(self.dir, "run")
            trained = self.run("train", "train", store, "--head", "logreg", "--out", run_dir, "--json", "--no-report")
            if trained is not None:
                self.expect_clean("train", {s: trained[s] for s in ("train", "validation", "test")}, clean["train"])
            compared = self.run("compare", "compare", store, "--heads", "logreg", "--json")
            if compared is not None:
                self.expect_clean("compare", [[e["validation"], e["test"]] for e in compared["leaderboard"]],
                                  clean["compare"])
            if c["id"] % 8 == 0:
                searched = self.run("search", "search", store, "--out", os.path.join(self.dir, "search"), "--trials", "1",
                                    "--heads", "logreg", "--json")
                if searched is not None:
                    best = searched["best"]
                    self.expect_clean("search", [best["params"], best["loss"], best["test"]], clean["search"])
            before = open(store, "rb").read()
            again = self.run("extract0", "extract", os.path.join(self.work, "images"), store, *EXTRACT)
            if self.exits["extract0"] == 1 and open(store, "rb").read() != before:
                self.problems.append("extract0 refused the store but wrote into it")
            if again is not None:  # a deleted feature set is extracted anew
                want = (clean["rows"], 0) if deleted else (0, clean["rows"])
                self.expect_clean("extract0", [again["extracted"], again["reused"], again["shape"]],
                                  [*want, clean["shape"]])
        expected = c.get("rows")
        if verify["ok"]:
            if deleted:
                if verify["feature_sets"]:
                    self.problems.append("verify lists a deleted feature set")
            elif not same_rows(rows_by_digest(store), clean["rows_by_digest"]):
                self.problems.append("verify says ok but the store does not read like the clean one")
            if expected:
                self.problems.append(f"verify missed damage in rows {expected}")
        else:
            reported = reported_rows(verify)
            if expected and reported is not None and not set(range(*expected)) <= reported:
                self.problems.append(f"verify reports rows {sorted(reported)[:20]}, not all of {expected}")
        if c["kind"] == "truncate" and verify["ok"]:
            self.problems.append("verify did not notice the truncation")
        repaired = self.run("repair", "repair", store, "--json")
        lost = clean["rows"]
        if repaired is not None and repaired["repaired"]:
            lost = clean["rows"] - sum(k["rows_kept"] for k in repaired["kept"])
            if not os.path.exists(repaired["damaged_copy"]):
                self.problems.append("repair did not keep the damaged file")
        elif repaired is not None:  # nothing to repair; a deleted feature set is gone until extract0 or extract
            lost = clean["rows"] if deleted and self.exits.get("extract0") != 0 else 0
        healed = self.run("extract", "extract", os.path.join(self.work, "images"), store, *EXTRACT)
        if healed is None:
            self.problems.append("extract after repair failed")
        else:
            if healed["extracted"] != lost and repaired is not None:
                self.problems.append(f"extract after repair recomputed {healed['extracted']} rows, repair lost {lost}")
            if not same_rows(rows_by_digest(store), clean["rows_by_digest"]):
                self.problems.append("repair + extract does not give the clean run's rows")
        kept = None if repaired is None or not repaired["repaired"] else clean["rows"] - lost
        return {"done": c["id"], "problems": self.problems, "seconds": self.seconds, "exits": self.exits,
                "verify_ok": verify["ok"], "kept": kept}


    def check_unrecognisable(self) -> dict:
        """The HDF5 signature is gone: the file is not recognisably a store (it could be anyone's
        data), so every command refuses it with one line and none writes to it."""
        before = open(self.store, "rb").read()
        for name, args in (("info", ["info", self.store]), ("verify", ["verify", self.store]),
                           ("repair", ["repair", self.store]),
                           ("extract", ["extract", os.path.join(self.work, "images"), self.store, *EXTRACT])):
            self.run(name, *args)
            if self.exits[name] != 1:
                self.problems.append(f"{name}: exit {self.exits[name]} on a file without the HDF5 signature")
        if open(self.store, "rb").read() != before:
            self.problems.append("a command wrote into a file that is not recognisably a store")
        return {"done": self.case["id"], "problems": self.problems, "seconds": self.seconds, "exits": self.exits,
                "verify_ok": False, "kept": None}


def load_clean(work: str) -> dict:
    with open(os.path.join(work, "clean.json")) as fh:
        clean = json.load(fh)
    clean["rows_by_digest"] = rows_by_digest(os.path.join(work, "clean.h5"))
    return clean


def main(work: str, ids: list[int]) -> None:
    import featcache.classify.train.harness  # noqa: F401  (imports that the first train or search would time)
    import featcache.classify.search.search  # noqa: F401
    import sklearn.linear_model  # noqa: F401

    with open(os.path.join(work, "cases.json")) as fh:
        cases = {c["id"]: c for c in json.load(fh)}
    clean = load_clean(work)
    for i in ids:
        print(json.dumps({"start": i}), flush=True)
        try:
            result = Case(work, cases[i], clean).check()
        except Exception as exc:  # a bug in a check, reported as a problem of this case
            result = {"done": i, "problems": [f"worker: {exc!r}"], "seconds": {}, "exits": {}}
        print(json.dumps(result), flush=True)
        shutil.rmtree(os.path.join(work, f"case{i}"), ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(i) for i in sys.argv[2:]])
