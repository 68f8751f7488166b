"""Running the shards of one extraction as Ray tasks, then merging them (``extract --ray``).

Each shard is one Ray task (``num_cpus=cpus_per_worker``, ``num_gpus=gpus_per_worker``) that
builds its model once and extracts its shard into ``OUT.h5.shards/shard-IIII-of-NNNN.h5``;
the driver then merges the committed shards into ``OUT.h5`` (virtual datasets, no copy).
The shard folder must be on storage every worker can write and the driver can read.
Workers import featcache, so on a cluster featcache must be installed on every node
(the same version); a local instance started here passes this featcache's location on.

Ray is imported only here, and only when ``--ray`` is used.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import time

from ...errors import FeatcacheError

RAY_MISSING = "Ray is not installed: pip install 'featcache[ray]'"
LOCAL_OBJECT_STORE_BYTES = 128 << 20  # tasks return small dicts; the default (30% of RAM) is far too much


def import_ray():
    try:
        import ray
    except ImportError:
        raise FeatcacheError(RAY_MISSING) from None
    return ray


def _limit_threads(cpus: int) -> None:
    """Let a worker's TensorFlow use the cores Ray gave the task, not every core of the node.

    TF_NUM_INTRAOP_THREADS set by the user (in the workers' environment) wins."""
    threads = os.environ.get("TF_NUM_INTRAOP_THREADS") or str(max(1, int(cpus)))
    if "tensorflow" not in sys.modules:  # read by TF when it initialises
        os.environ["TF_NUM_INTRAOP_THREADS"] = threads
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1" if int(threads) <= 2 else "2")
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
    except RuntimeError:  # TF already initialised in this reused worker: keep its pool
        pass


def shard_task(image_dir: str, store: str, config_fields: dict, shard: tuple[int, int], cpus: int) -> dict:
    """One shard on a Ray worker: one model, one shard store, one commit record."""
    from ..pipeline import ExtractConfig
    from .sharding import run_shard

    _limit_threads(cpus)
    fields = dict(config_fields)
    fields["split_fractions"] = tuple(fields["split_fractions"])
    fields.setdefault("decode_workers", None)
    if fields["decode_workers"] is None:
        fields["decode_workers"] = max(1, int(cpus))
    config = ExtractConfig(**{**fields, "progress": False})
    result = run_shard(image_dir, store, config, shard)
    result["host"] = os.uname().nodename
    return result


def _start_ray(ray, address: str | None) -> bool:
    """Connect to ``address`` or start a local instance; False if Ray was already running here."""
    if ray.is_initialized():
        return False
    options = {"include_dashboard": False, "log_to_driver": True}
    if address:
        options["address"] = address
    else:
        # Local workers run on this machine: hand them this featcache (also when it is a checkout).
        package_parent = str(pathlib.Path(__file__).resolve().parents[3])  # the folder holding featcache/
        path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p)
        options.update(num_cpus=os.cpu_count() or 1, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                       runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        ray.init(**options)
    except ConnectionError as exc:
        raise FeatcacheError(f"--ray {address}: cannot connect to the Ray cluster ({exc})") from None
    return True


def _default_shards(ray, cpus: float, gpus: float) -> int:
    resources = ray.cluster_resources()
    if gpus:
        return max(1, int(resources.get("GPU", 0) // gpus))
    return max(1, int(resources.get("CPU", 1) // cpus))


def _error_text(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, FeatcacheError):
        return str(cause)
    text = str(cause or exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def run_ray(image_dir: str, out: str, config, shards: int | None = None, address: str | None = None,
            gpus_per_worker: float = 0, cpus_per_worker: int = 1, log=None) -> dict:
    """Extract ``image_dir`` as ``shards`` Ray tasks into ``OUT.shards/`` and merge into ``out``.

    Committed shards are skipped, others resume, so re-running after a failure is cheap.
    Returns the summary of the merged result plus per-shard summaries."""
    from ...cache.shards import merge, read_marker
    from ..pipeline import key_spec
    from .sharding import shard_paths

    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    if shards is not None and shards < 1:
        raise FeatcacheError(f"--shards {shards}: must be at least 1")
    if gpus_per_worker < 0 or cpus_per_worker < 1:
        raise FeatcacheError("--gpus-per-worker must be >= 0 and --cpus-per-worker >= 1")
    if not os.path.isdir(image_dir):
        raise FeatcacheError(f"{image_dir}: image folder does not exist")
    # Bad options fail here, before any cluster work; and "auto" precision is resolved once,
    # on the driver, so workers on different devices still write shards of one key.
    config = dataclasses.replace(config, precision=key_spec(config).precision)
    if config.weights and os.path.exists(config.weights):  # workers may run in another folder
        config = dataclasses.replace(config, weights=os.path.abspath(config.weights))
    ray = import_ray()
    out = os.fspath(out)
    shard_dir = out + ".shards"
    started = time.perf_counter()
    started_here = _start_ray(ray, address)
    try:
        count = shards or _default_shards(ray, cpus_per_worker, gpus_per_worker)
        os.makedirs(shard_dir, exist_ok=True)
        paths = shard_paths(shard_dir, count)
        task = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, retry_exceptions=False)(shard_task)
        fields = dataclasses.asdict(config)
        pending = {
            task.remote(os.path.abspath(image_dir), os.path.abspath(p), fields, (i, count), cpus_per_worker): i
            for i, p in enumerate(paths)
        }
        log(f"ray: {count} shards on {ray.cluster_resources().get('CPU', 0):g} CPUs, "
            f"{ray.cluster_resources().get('GPU', 0):g} GPUs; shard stores in {shard_dir}")
        results, errors = {}, {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                r = ray.get(done[0])
            except Exception as exc:  # a task error: keep going, report all at the end
                errors[i] = _error_text(exc)
                log(f"  shard {i}/{count} failed: {errors[i]}")
                continue
            results[i] = r
            log(f"  shard {i}/{count} {r['status']}: {r['shard_images']} images, extracted {r['extracted']}, "
                f"failed {r['failed']} in {r['seconds']:.1f} s on {r['host']}")
    finally:
        if started_here:
            ray.shutdown()
    if errors:
        listing = "; ".join(f"{i}/{count}: {e}" for i, e in sorted(errors.items()))
        raise FeatcacheError(
            f"{len(errors)} of {count} shards failed ({listing}); committed shards are kept in {shard_dir}, "
            "run the same command again to redo only the others"
        )
    # Every feature set committed in all shards (earlier runs with other options included).
    name = results[0]["feature_set"]
    common = set.intersection(*(set(read_marker(p)["feature_sets"]) for p in paths)) | {name}
    merged = merge(paths, out, feature_sets=sorted(common))
    seconds = time.perf_counter() - started
    ordered = [results[i] for i in range(count)]
    extracted = sum(r["extracted"] for r in ordered)
    fs = next(f for f in merged["feature_sets"] if f["feature_set"] == name)
    first = ordered[0]
    return {
        "feature_set": fs["feature_set"],
        "store": out,
        "shape": fs["shape"],
        "extracted": extracted,
        "reused": fs["rows_active"] - extracted,
        "failed": sum(r["failed"] for r in ordered),
        "failures": [f for r in ordered for f in r["failures"]],
        "skipped": first["skipped"],
        "warnings": first["warnings"],
        "class_names": first["class_names"],
        "seconds": round(seconds, 3),
        "images_per_second": round(extracted / seconds, 2) if extracted else 0.0,
        "shard_dir": shard_dir,
        "shards": [{k: r[k] for k in ("shard", "status", "shard_images", "extracted", "failed", "seconds", "host")}
                   for r in ordered],
        "merge": merged,
    }
