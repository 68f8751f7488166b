"""``featcache upgrade``: a run directory written before the safe head format, rewritten in it.

Its pickled model file is loaded once, under the caller's trust (calling upgrade is saying so),
saved again as arrays (heads/safe_arrays.py), and config.json is pointed at the new file and its
sha256. The run's test split is predicted before and after (from the store, as reports do), or
a seeded sample of feature rows when the store is gone; the two must agree exactly, otherwise
the run is left as it was.
"""
from __future__ import annotations

import os
import time

import numpy as np

from ...errors import FeatcacheError
from ..heads.safe_arrays import is_pickle_file, trusting_pickles
from . import run_dir as rundir
from .cached import split_probabilities
from .kinds import kind_of, load_run

SAMPLE_ROWS = 64  # feature rows checked when the store is not there


def _probabilities(run, run_dir: str) -> tuple[np.ndarray, str]:
    """(probabilities, what they were computed on) of the run's test split, or of seeded rows."""
    try:
        p = split_probabilities(run_dir, "test", run)
        if len(p.labels):
            return p.proba, f"the test split ({len(p.labels)} images, from the store)"
        reason = "its test split is empty"
    except FeatcacheError as exc:
        reason = str(exc)
    rng = np.random.default_rng(0)
    features = {r["name"]: rng.standard_normal((SAMPLE_ROWS, *r["feature_shape"])).astype(np.float32)
                for r in run.feature_sets}
    return run.proba(features), f"{SAMPLE_ROWS} seeded random feature rows ({reason})"


def upgrade(run_dir: str) -> dict:
    started = time.perf_counter()
    config = rundir.read_config(run_dir)
    kind_of(config)  # a kind this featcache knows
    old_name = os.path.basename((config.get("model") or {}).get("file", ""))
    result = {"run_dir": run_dir, "upgraded": False, "from": old_name or None, "to": old_name or None,
              "checked_on": None, "rows": 0, "max_abs_difference": None}
    if not is_pickle_file(old_name):
        result["seconds"] = round(time.perf_counter() - started, 3)
        return result  # nothing featcache loads from this run is a pickle
    with trusting_pickles(True):
        before_run = load_run(run_dir)  # sha256 checked, then the pickle loaded once
    before, checked_on = _probabilities(before_run, run_dir)
    new_path = before_run.head.save(run_dir)
    config_path = os.path.join(run_dir, rundir.CONFIG)
    new_config = {**config, "model": {**config["model"], "file": os.path.basename(new_path),
                                      "sha256": rundir.sha256_file(new_path)}}
    rundir.write_json(config_path, new_config)
    try:
        after, _ = _probabilities(load_run(run_dir), run_dir)  # untrusted: no pickle may be read now
        if after.shape != before.shape or not np.array_equal(after, before):
            diff = float(np.max(np.abs(after - before))) if after.shape == before.shape else float("inf")
            raise FeatcacheError(f"{run_dir}: the rewritten head predicts differently (max difference {diff:.3g} on "
                                 f"{checked_on}); the run was left as it was")
    except BaseException:
        rundir.write_json(config_path, config)
        os.remove(new_path)
        raise
    os.remove(os.path.join(run_dir, old_name))
    result.update(upgraded=True, to=os.path.basename(new_path), checked_on=checked_on, rows=int(len(before)),
                  max_abs_difference=0.0, seconds=round(time.perf_counter() - started, 3))
    return result
