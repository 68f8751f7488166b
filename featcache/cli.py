"""The command line: one thin click command per task. No logic lives here.

Imports of TensorFlow and of the stage packages happen inside the commands, so
``featcache --help``, ``bases`` and ``info`` stay instant.
"""
from __future__ import annotations

import json
import sys

import click

from . import api
from .classify.deploy import FORMATS as EXPORT_FORMATS
from .extract import defaults as EXTRACT
from .version import __version__
from .errors import FeatcacheError


class _Group(click.Group):
    """Prints FeatcacheError as one line and exits 1; --debug shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FeatcacheError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {_safe(str(exc))}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as exc:  # extract's clean stop on SIGINT/SIGTERM: 130/143
            status = getattr(exc, "exit_status", None)
            if status is None:  # Ctrl-C outside extraction's handlers (start-up, training)
                if ctx.obj and ctx.obj.get("debug"):
                    raise
                click.echo("interrupted", err=True)
                sys.exit(130)  # the shell's convention, not click's "Aborted!" and 1
            click.echo(_safe(str(exc)), err=True)
            sys.exit(status)


def _safe(text: str) -> str:
    """Strings from files and stores, printable on one line: control characters (newlines and
    terminal escapes included) and undecodable bytes of file names escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="featcache")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx, debug):
    """Cached convolutional features for fast transfer learning on images."""
    ctx.ensure_object(dict)["debug"] = debug


@cli.command()
@click.argument("image_dir", type=click.Path())
@click.argument("store", type=click.Path())
@click.option("--base", default=EXTRACT.BASE, show_default=True, help="Backbone name (see `featcache bases`).")
@click.option("--size", type=int, help="Square input size [default: the base's default].")
@click.option("--weights", default=EXTRACT.WEIGHTS, show_default=True, help="imagenet, bundled (the MobileNet alpha 0.25 ImageNet file shipped with featcache, for --base mobilenet_0.25), none (random init) or a path to a .h5 file.")
@click.option("--layer", help="Layer whose output is cached [default: the last conv output].")
@click.option("--pooling", type=click.Choice(["none", "avg", "max"]), default=EXTRACT.POOLING, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=EXTRACT.BATCH_SIZE, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default=EXTRACT.DTYPE, show_default=True, help="Storage dtype.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=EXTRACT.PRECISION, show_default=True,
              help="Compute precision of the base (part of the cache key). auto: fp16 on a GPU of compute capability >= 7.0; "
                   "bf16 on a CPU with AVX512_BF16/AMX for vgg16/vgg19; fp32 otherwise (depthwise bases lose fidelity in bf16).")
@click.option("--decode", type=click.Choice(EXTRACT.DECODERS), default=EXTRACT.DECODE, show_default=True,
              help="Where JPEGs are decoded. hybrid: the GPU decoder and decoding processes at once (gpu-bilinear on both). auto: gpu "
                   "where nvImageCodec is installed, a GPU is visible and cores <= 10; processes on 8+ cores (4+ beside a GPU); "
                   "threads otherwise.")
@click.option("--decode-workers", type=click.IntRange(min=1), help="Decoding threads or processes [default: threads min(4, cores), processes cores - 1].")
@click.option("--xla", is_flag=True, help="Compile the model step with XLA (TensorFlow; measured slower on CPUs, try it on GPUs).")
@click.option("--decode-processes", is_flag=True, help="The same as --decode processes.")
@click.option("--resize", default=EXTRACT.RESIZE, show_default=True,
              help="Resize method (part of the cache key): nearest, bilinear, bicubic, lanczos, box (Pillow; +jpeg-draft lets libjpeg "
                   "downscale first), gpu-bilinear (--decode gpu's filter). auto: gpu-bilinear with --decode gpu, "
                   "bilinear+jpeg-draft on 8+ cores or beside a GPU, bilinear otherwise.")
@click.option("--split", default=EXTRACT.SPLIT, show_default=True, help="train,validation,test fractions when the folder has no split folders.")
@click.option("--split-seed", type=int, default=EXTRACT.SPLIT_SEED, show_default=True)
@click.option("--seed", type=int, default=EXTRACT.SEED, show_default=True, help="Seed for random init (--weights none).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=EXTRACT.MAX_PIXELS, show_default=True, help="Refuse images with more pixels than this, before decoding.")
@click.option("--follow-symlinks", is_flag=True, help="Follow symlinks that leave IMAGE_DIR.")
@click.option("--unlabeled", is_flag=True, help="Every image anywhere below IMAGE_DIR, without classes: features and "
              "paths only (a folder whose images sit directly in it is always extracted so).")
@click.option("--rehash", is_flag=True, help="Read and hash every file, also those whose path, size, mtime, ctime and inode "
              "match a stored row (which a re-run otherwise reuses without reading).")
@click.option("--strict", is_flag=True, help="Exit non-zero if any image failed.")
@click.option("--augment", type=click.IntRange(min=0), default=EXTRACT.AUGMENT, show_default=True, metavar="K",
              help="Also store K augmented views (flip, rotation, zoom, translation, contrast) per training image, as a feature set of its own.")
@click.option("--aug-seed", type=int, default=EXTRACT.AUG_SEED, show_default=True, help="Seed of the augmented views (part of the key).")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--shard", metavar="I/N", help="Extract only shard I of N (0-based) into STORE and commit it; join shards with `featcache merge`.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run the shards as Ray tasks (a local Ray instance without ADDRESS, e.g. 'auto' or 'ray://head:10001' for a cluster), then merge into STORE.")
@click.option("--shards", type=click.IntRange(min=1), help="With --ray: number of shards [default: one per worker slot of the cluster].")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), help="With --ray: GPUs per shard task [default: 0].")
@click.option("--cpus-per-worker", type=click.IntRange(min=1), help="With --ray: CPUs (and TF threads) per shard task [default: 1].")
def extract(image_dir, store, strict, no_progress, as_json, ray_address, **options):
    """Extract features of IMAGE_DIR (one subfolder per class, or unlabeled images) into STORE (HDF5)."""
    result = api.extract_features(image_dir, store, progress=not no_progress, ray=ray_address,
                                  log=lambda text: click.echo(text, err=True), **options)
    if as_json:
        _emit_json(result)
    else:
        _print_extract(result)
    # An empty shard is fine (few images, many shards); an empty whole listing is not.
    nothing = result["extracted"] + result["reused"] == 0 and result.get("shard_images", 1) > 0
    sys.exit(1 if nothing or (strict and result["failed"]) else 0)


def _print_extract(result: dict) -> None:
    if "shard" in result:
        i, n = result["shard"]
        what = "already committed, skipped" if result["status"] == "skipped" else "committed"
        click.echo(f"shard {i}/{n} of {result['store']}: {what} ({result['shard_images']} images in this shard)")
    if "merge" in result:
        m = result["merge"]
        click.echo(f"merged {len(m['merged_shards'])} shards from {result['shard_dir']} into {m['store']} "
                   f"({m['bytes'] / 2**20:.2f} MiB; shards {m['shard_bytes'] / 2**20:.2f} MiB)")
    click.echo(f"feature set {result['feature_set']}: shape {tuple(result['shape'])}"
               + ("" if result["class_names"] else " (unlabeled: features and paths)"))
    click.echo(
        f"  extracted {result['extracted']}, reused {result['reused']}, failed {result['failed']} "
        f"in {result['seconds']:.1f} s ({result['images_per_second']:.1f} images/s)"
    )
    if result["extracted"] and "startup_seconds" in result:  # a single run (--ray sums up many)
        click.echo(f"  start-up {result['startup_seconds']:.1f} s (model build, first compile, first batch), "
                   f"images/s counted after it; decoding: {result['decode']}, resize {result['resize']}")
    for item in result["failures"]:
        click.echo(f"  failed: {_safe(item['path'])}: {_safe(item['reason'])}", err=True)
    for item in result["skipped"]:
        click.echo(f"  skipped: {_safe(item['path'])}: {_safe(item['reason'])}", err=True)
    for warning in result["warnings"]:
        click.echo(f"  warning: {_safe(warning)}", err=True)


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def info(store, as_json):
    """Show the feature sets of STORE: key, counts per class and split, failures."""
    result = api.info(store)
    if as_json:
        _emit_json(result)
        return
    summaries = result["feature_sets"]
    if not summaries:
        click.echo(f"{store}: no feature sets")
    for fs in summaries:
        unchecked = "" if fs["checksums"] else "  (unchecked: written before featcache stored checksums)"
        click.echo(f"{fs['feature_set']}  shape {tuple(fs['shape'])} {fs['dtype']}{unchecked}")
        click.echo("  key: " + ", ".join(f"{k}={_safe(str(v))}" for k, v in fs["key"].items()))
        if not fs["labelled"]:
            click.echo(f"  unlabeled  {fs['rows_active']} images (no class folders: features and paths only)")
        for split, counts in fs["counts"].items():
            click.echo(f"  {split:<10} " + "  ".join(f"{_safe(c)}={n}" for c, n in counts.items()))
        if fs["rows_stored"] != fs["rows_active"]:
            click.echo(f"  rows stored {fs['rows_stored']} (not in the current listing: {fs['rows_stored'] - fs['rows_active']})")
        for item in fs["failures"]:
            click.echo(f"  failed: {_safe(item['path'])}: {_safe(item['reason'])}")


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def verify(store, as_json):
    """Read all of STORE: every chunk's checksum and the consistency of its columns; list what is
    damaged down to rows. Exit 1 if anything is damaged."""
    from .cache.integrity.verify import format_report

    result = api.verify(store)
    if as_json:
        _emit_json(result)
    else:
        for line in format_report(result):
            click.echo(_safe(line))
    if not result["ok"]:
        click.echo(f"error: {_safe(store)} is damaged; `{_safe(result['repair'])}` keeps what can still be read",
                   err=True)
        sys.exit(1)


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def repair(store, as_json):
    """Rewrite a damaged STORE with every row that can still be read; the damaged file is kept
    as STORE.damaged-TIME. The next extract of the same folder re-extracts the rows left out."""
    result = api.repair(store)
    if as_json:
        _emit_json(result)
        return
    if not result["repaired"]:
        click.echo(f"{store}: no damage found; nothing to do")
        return
    click.echo(f"repaired {store} (the damaged file is kept as {result['damaged_copy']})")
    for fs in result["kept"]:
        if fs["lost"]:
            click.echo(f"  {fs['feature_set']}: lost ({_safe(fs['lost'])})")
            continue
        aside = f", {fs['rows_set_aside']} set aside until the next extract" if fs["rows_set_aside"] else ""
        click.echo(f"  {fs['feature_set']}: kept {fs['rows_kept']} of {fs['rows']} rows ({fs['rows_lost']} lost{aside})")
    if result["nothing_recovered"]:
        click.echo(f"  nothing could be recovered: {store} is now empty", err=True)
    click.echo("  run the same featcache extract again to re-extract what was lost", err=True)


@cli.command()
@click.argument("shards", nargs=-1, required=True, type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--allow-missing", is_flag=True, help="Merge the committed shards even if some are missing or unfinished.")
@click.option("--feature-set", "feature_sets", multiple=True, help="Merge only this feature set (repeatable) [default: all].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def merge(shards, out, allow_missing, feature_sets, as_json):
    """Join committed shard stores (extract --shard) into OUT; features are not copied."""
    result = api.merge(list(shards), out, allow_missing=allow_missing, feature_sets=list(feature_sets))
    if as_json:
        _emit_json(result)
        return
    click.echo(f"merged shards {', '.join(map(str, result['merged_shards']))} of {result['shard_count']} into {out} "
               f"({result['bytes'] / 2**20:.2f} MiB; shards {result['shard_bytes'] / 2**20:.2f} MiB)")
    for fs in result["feature_sets"]:
        counts = ", ".join(f"{s} {n}" for s, n in fs["counts"].items())
        click.echo(f"  {fs['feature_set']}: shape {tuple(fs['shape'])} ({counts}), failures {fs['failures']}")
    for problem in result["missing"]:
        click.echo(f"  warning: {_safe(problem)}", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def bases(as_json):
    """List the backbone registry."""
    rows = api.bases()
    if as_json:
        _emit_json(rows)
        return
    for b in rows:
        click.echo(f"{b['name']:<22} size {b['default_size']:<4} preprocessing {b['preprocessing']:<7} "
                   f"top block {','.join(b['top_block']) or '-'}")


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), default="featcache-demo", show_default=True,
              help="Folder for the images, the feature store, the runs and the exported model (reused by the next run).")
@click.option("--per-class", type=click.IntRange(min=5), default=100, show_default=True, help="Images per class (60/20/20 train/validation/test).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the image generator.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def demo(workdir, per_class, seed, as_json):
    """Run the whole job offline on images it draws itself.

    Draws four texture classes (train/validation/test folders), extracts raw pixels and
    MobileNet alpha 0.25 features (ImageNet weights bundled with featcache), trains logistic
    regression and the dense head, prints a leaderboard, exports the best model
    and writes its HTML report.
    A second run reuses the images and the cached features."""
    from .demo_job import format_report

    result = api.demo(workdir=workdir, per_class=per_class, seed=seed, log=lambda text: click.echo(f"demo: {text}", err=True))
    if as_json:
        _emit_json(result)
    else:
        click.echo(format_report(result))


# -- stage two: heads on cached features ------------------------------------------------------


def _head_options(f):
    """Head options shared by train and compare; unset ones keep the head's default, and an
    option the chosen head does not take is an error (train) or skipped for it (compare)."""
    options = [
        click.option("--pool", type=click.Choice(["none", "avg", "max"]), help="Pool (H, W, C) features before the head: none = flatten [none]."),
        click.option("--units", type=click.IntRange(min=1), help="dense: hidden units [256]."),
        click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), help="dense: dropout rate [0.5]."),
        click.option("--l2", type=click.FloatRange(min=0), help="dense: L2 penalty on the hidden layer's kernel [0]."),
        click.option("--optimizer", type=click.Choice(["rmsprop", "adam", "adamw", "sgd", "nadam", "adagrad"]), help="dense: optimizer [rmsprop]."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="dense: learning rate [2e-5]."),
        click.option("--epochs", type=click.IntRange(min=1), help="dense: epochs [30]."),
        click.option("--batch-size", type=click.IntRange(min=1), help="dense: batch size [20]."),
        click.option("--steps-per-execution", type=click.IntRange(min=1), help="dense: batches per compiled call; same result, less overhead [32]."),
        click.option("-C", "--C", "C", type=click.FloatRange(min=0, min_open=True), help="logreg: inverse L2 strength [1.0]."),
        click.option("--max-iter", type=click.IntRange(min=1), help="logreg: lbfgs iterations [1000]."),
        click.option("--stream-epochs", type=click.IntRange(min=1), help="logreg: passes of the streamed SGD solver [20]."),
        click.option("--neighbors", type=click.IntRange(min=1), help="knn: neighbours that vote [5]."),
        click.option("--metric", type=click.Choice(["cosine", "euclidean"]), help="knn: distance [cosine]."),
        click.option("--seed", type=int, help="Seed of init, dropout and shuffling [0]."),
        click.option("--standardize", type=click.BOOL, metavar="yes|no",
                     help="dense: scale inputs by the training rows' mean and variance, kept in the model, so the untrained head starts near chance [yes]."),
        click.option("--memory-budget", "memory_budget_mb", type=click.FloatRange(min=0), default=api.DEFAULT_MEMORY_BUDGET_MB, show_default=True,
                     help="MB. Train+validation features (float32) above this stream from the store in chunks; 0 = always stream."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _exclude_option(command):
    """--exclude FILE on the commands that train or score heads on a store's rows."""
    return click.option("--exclude", type=click.Path(dir_okay=False), metavar="FILE",
                        help="Leave out the images listed in FILE (one relative path a line, e.g. `featcache audit`'s "
                             "exclude.txt); the run records them.")(command)


def _fmt(value, spec=".4f") -> str:
    return "-" if value is None else format(value, spec)


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--feature-set", help="Feature set name (see `featcache info`).")
@click.option("--feature-sets", metavar="A,B[,C]", help="Fuse several feature sets of the same images: one head on their "
              "concatenation (each pooled per --pool or flattened), a multi-input model.")
@click.option("--base", help="Use the only feature set of this base instead of naming one.")
@click.option("--head", type=click.Choice(["dense", "logreg", "knn"]), default="dense", show_default=True)
@click.option("--out", type=click.Path(), required=True, help="New run directory (model, config, metrics, plots).")
@_head_options
@click.option("--early-stopping", type=click.IntRange(min=1), metavar="PATIENCE", help="dense: stop when validation loss has not improved for PATIENCE epochs (best weights kept).")
@click.option("--checkpoint", is_flag=True, help="dense: keep the best model by validation loss (RUN_DIR/best.keras) as the run's model.")
@click.option("--reduce-lr", type=click.IntRange(min=1), metavar="PATIENCE", help="dense: learning rate / 10 after PATIENCE epochs without validation improvement.")
@click.option("--csv-log", is_flag=True, help="dense: write history.csv epoch by epoch while training (written at the end anyway).")
@click.option("--tensorboard", type=click.Path(file_okay=False), metavar="DIR", help="dense: TensorBoard log folder (needs the tensorboard package).")
@click.option("--no-report", is_flag=True, help="Do not write RUN_DIR/report.html (see `featcache report`).")
@_exclude_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def train(store, feature_set, feature_sets, base, head, out, memory_budget_mb, no_report, as_json, **options):
    """Train a head on a feature set of STORE (or one fused head on several); write the run directory --out."""
    result = api.train(store, out=out, feature_set=feature_set, feature_sets=feature_sets, base=base, head=head,
                       memory_budget_mb=memory_budget_mb, no_report=no_report, **options)
    if as_json:
        _emit_json(result)
        return
    u = result["untrained"]
    click.echo(f"{result['head']} on {result['feature_set']}{' (streamed)' if result['streaming'] else ''}")
    click.echo(f"  untrained   ({u['split']}) accuracy {_fmt(u['accuracy'])} loss {_fmt(u['loss'])} "
               f"(chance {u['chance_accuracy']:.4f}, ln K {u['expected_loss']:.4f})")
    _echo_splits(result, f"trained in {result['seconds']:.1f} s; ")
    if u["flag"]:
        click.echo(f"  warning: {u['reason']}", err=True)
    if result["overfitting"]["flag"]:
        click.echo(f"  warning: overfitting: {result['overfitting']['reason']}", err=True)


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--heads", default="dense,logreg", show_default=True, help="Comma-separated heads.")
@click.option("--feature-sets", help="Comma-separated feature set names [default: all in STORE].")
@click.option("--cv", type=click.IntRange(min=2), metavar="K", help="K-fold stratified cross-validation on train+validation instead of the fixed split.")
@_head_options
@click.option("--out", type=click.Path(), help="New folder: each entry as a run directory HEAD-FEATURE_SET (not with --cv), "
              "leaderboard.json, and leaderboard.html linking each run's report.html.")
@click.option("--no-report", is_flag=True, help="With --out: no HTML (run directories and leaderboard.json only).")
@_exclude_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def compare(store, heads, feature_sets, cv, memory_budget_mb, out, no_report, as_json, **options):
    """Leaderboard of heads x feature sets of STORE on the same images and metrics."""
    result = api.compare(store, heads=heads, feature_sets=feature_sets, cv=cv, memory_budget_mb=memory_budget_mb,
                         out=out, no_report=no_report, **options)
    if as_json:
        _emit_json(result)
        return
    _print_leaderboard(store, result, cv)
    if result.get("leaderboard_html"):
        click.echo(f"leaderboard {result['leaderboard_html']}")
    elif out:
        click.echo(f"runs and leaderboard.json in {out}")


def _print_leaderboard(store, result, cv):
    rows = result["rows"]
    click.echo(f"{store}: train {rows['train']}, validation {rows['validation']}, test {rows['test']} images"
               + (f" ({result['rows_left_out']} rows not in every feature set left out)" if result["rows_left_out"] else ""))
    w = max(len("feature set"), *(len(e["feature_set"]) for e in result["leaderboard"]))
    if cv:
        click.echo(f"{'#':<3} {'head':<7} {'feature set':<{w}} {f'cv{cv} accuracy':>17} {f'cv{cv} loss':>17} {'seconds':>8}")
        for e in result["leaderboard"]:
            c = e["cv"]
            click.echo(f"{e['rank']:<3} {e['head']:<7} {e['feature_set']:<{w}} "
                       f"{c['accuracy_mean']:>8.4f} ± {c['accuracy_std']:.4f} {c['loss_mean']:>8.4f} ± {c['loss_std']:.4f} {e['seconds']:>8.1f}")
        return
    click.echo(f"{'#':<3} {'head':<7} {'feature set':<{w}} {'val acc':>8} {'val loss':>8} {'test acc':>8} {'test loss':>9} {'seconds':>8}")
    for e in result["leaderboard"]:
        v, t = e["validation"], e["test"]
        click.echo(f"{e['rank']:<3} {e['head']:<7} {e['feature_set']:<{w}} {_fmt(v['accuracy']):>8} {_fmt(v['loss']):>8} "
                   f"{_fmt(t['accuracy']):>8} {_fmt(t['loss']):>9} {e['seconds']:>8.1f}")


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--out", type=click.Path(), required=True, metavar="DIR",
              help="Search folder: study.db, leaderboard, plots, best/. The same command resumes the search in it.")
@click.option("--trials", type=int, default=30, show_default=True, help="Finished (complete or pruned) trials the study should hold, earlier runs' included.")
@click.option("--timeout", type=float, metavar="S", help="Start no new trial after S seconds of this run.")
@click.option("--heads", default="dense,logreg", show_default=True, help="Comma-separated heads to search.")
@click.option("--feature-sets", help="Comma-separated feature set names [default: all in STORE].")
@click.option("--cv", type=click.IntRange(min=2), metavar="K", help="Rank trials by K-fold cross-validation of train+validation instead of the validation split.")
@click.option("--study", help="Study name in DIR/study.db [default: the one there, or 'search' for a new one].")
@click.option("--sampler", type=click.Choice(["tpe", "random"]), default="tpe", show_default=True, help="Optuna sampler (TPE: Bayesian optimisation).")
@click.option("--pruner", type=click.Choice(["median", "none"]), default="median", show_default=True, help="Stop dense trials whose validation loss is worse than the median at the same epoch.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler and of every trial's head.")
@click.option("--memory-budget", "memory_budget_mb", type=click.FloatRange(min=0), default=api.DEFAULT_MEMORY_BUDGET_MB,
              show_default=True, help="MB. Train+validation features (float32) above this stream from the store in chunks.")
@_exclude_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def search(store, as_json, **options):
    """Search heads, feature sets and head settings of STORE with Optuna (resumable).

    Trials are ranked on validation loss (or --cv); only the top trials are tested, and the
    best is retrained as an ordinary run directory DIR/best."""
    result = api.search(store, log=lambda text: click.echo(_safe(text), err=True), **options)
    if as_json:
        _emit_json(result)
        return
    t = result["trials"]
    click.echo(f"study {result['study']!r} in {result['storage'].removeprefix('sqlite:///')}: {t['finished']} of "
               f"{t['requested']} trials finished ({t['complete']} complete, {t['pruned']} pruned), {t['fail']} failed; "
               f"{t['ran_here']} run now in {result['seconds']:.1f} s" + (" (stopped by --timeout)" if result["stopped"] == "timeout" else ""))
    ranked = [r for r in result["leaderboard"] if r["rank"] is not None][:10]
    if ranked:
        w = max(len("feature set"), *(len(r["feature_set"]) for r in ranked))
        metric = "cv loss" if options.get("cv") else "val loss"
        click.echo(f"{'#':<3} {'trial':>5} {'head':<7} {'feature set':<{w}} {metric:>8} {'accuracy':>8} {'test acc':>8} {'seconds':>8}")
        for r in ranked:
            test = (r["test"] or {}).get("accuracy")
            click.echo(f"{r['rank']:<3} {r['trial']:>5} {r['head']:<7} {r['feature_set']:<{w}} {_fmt(r['loss']):>8} "
                       f"{_fmt(r['accuracy']):>8} {_fmt(test):>8} {r['seconds']:>8.1f}")
    best = result["best"]
    if best:
        settings = ", ".join(f"{k}={v}" for k, v in best["params"].items())
        click.echo(f"best: trial {best['trial']} ({best['head']}, {settings})")
        click.echo(f"  test accuracy {_fmt(best['test']['accuracy'])} loss {_fmt(best['test']['loss'])}; run directory {best['run_dir']}")
    for key, path in result["files"].items():
        if key != "best_run":
            click.echo(f"  {key.replace('_', ' '):<18} {path}")
    for note in result["notes"]:
        click.echo(f"  note: {_safe(note)}", err=True)


def _trust_pickle_option(command):
    """--trust-pickle on every command that loads run directories."""
    return click.option("--trust-pickle", is_flag=True,
                        help="Load pickled model files (model.joblib, written by an older featcache); "
                             "a pickle can run any code. Better: convert the run once with `featcache upgrade RUN_DIR`.")(command)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True, help="Classes shown per image.")
@click.option("--weights", help="Weights file of the base, if it moved since extraction [default: as recorded].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--features", type=click.Path(), metavar="STORE",
              help="RUN_DIR is a head-only export (export --head-only): classify the rows of STORE's feature set instead of images.")
@_trust_pickle_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def predict(run_dir, images, top_k, weights, batch_size, features, trust_pickle, as_json):
    """Classify IMAGES (files or folders) with the base and head of RUN_DIR.

    RUN_DIR may also be an exported model (a .tflite, .keras or .onnx file, or a SavedModel folder,
    with its model card beside it): then it runs as deployed."""
    result = api.predict(run_dir, list(images), top_k=top_k, weights=weights, batch_size=batch_size,
                         features=features, trust_pickle=trust_pickle)
    if as_json:
        _emit_json(result)
    else:
        for p in result["predictions"]:
            click.echo(f"{_safe(p['path'])}: " + "  ".join(f"{_safe(t['class'])} {t['probability']:.4f}" for t in p["top"]))
        for item in result["failures"]:
            click.echo(f"failed: {_safe(item['path'])}: {_safe(item['reason'])}", err=True)
    sys.exit(0 if result["predictions"] else 1)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--format", "format_", type=click.Choice(EXPORT_FORMATS),
              help="keras (one .keras file), tflite (TensorFlow Lite), onnx (ONNX Runtime; pip install \"featcache[onnx]\") "
                   "or savedmodel (a SavedModel folder for TensorFlow Serving) [default: from OUT: .keras, .tflite, .onnx, "
                   "no extension = savedmodel].")
@click.option("--quantize", type=click.Choice(["none", "float16", "int8"]), default="none", show_default=True,
              help="tflite: float16 weights, or int8 full-integer quantization (uint8 image input) calibrated on training images.")
@click.option("--calibration-images", type=click.IntRange(min=1), default=300, show_default=True, metavar="N",
              help="--quantize int8: training images of the run's store to calibrate on (drawn with seed 0).")
@click.option("--evaluate/--no-evaluate", default=True, show_default=True,
              help="Run the exported file over the run's test images and record its accuracy in the card.")
@click.option("--weights", help="Weights file of the base, if it moved since extraction [default: as recorded].")
@click.option("--head-only", is_flag=True, help="The head alone (.keras or .onnx): cached features in, probabilities out; "
              "its card names the feature set and key the input must come from (predict --features STORE runs it).")
@_trust_pickle_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def export(run_dir, out, format_, quantize, calibration_images, evaluate, weights, head_only, trust_pickle, as_json):
    """Write RUN_DIR (preprocessing + base + head) as a deployable model OUT, with labels and a model card.

    The card (OUT.card.json, or model_card.json in a SavedModel folder) records the class names, the
    input, the run's key and metrics, and the test accuracy of the exported file itself, measured by
    running it over the run's test images."""
    result = api.export(run_dir, out, format=format_, quantize=quantize, calibration_images=calibration_images,
                        evaluate=evaluate, weights=weights, head_only=head_only, trust_pickle=trust_pickle)
    if as_json:
        _emit_json(result)
        return
    if result.get("head_only"):
        shown = ", ".join(f"{i['name']} {'x'.join(map(str, i['shape'][1:]))} from {i['feature_set']}" for i in result["inputs"])
        click.echo(f"exported the head of {run_dir} -> {out}: cached features in ({_safe(shown)}), "
                   f"probabilities of {', '.join(map(_safe, result['class_names']))} out; model card {result['card']}")
        test = result["exported_test"]
        if test["measured"]:
            click.echo(f"  test accuracy of the exported head {test['accuracy']:.4f} (n={test['n']}) on the cached rows; "
                       f"the run's {_fmt(result['run_test_accuracy'])}")
        for warning in result["warnings"]:
            click.echo(f"  warning: {_safe(warning)}", err=True)
        return
    inputs = result["inputs"]
    if len(inputs) == 1:
        size = inputs[0]["shape"]
        shown = f"input {size[0]}x{size[1]}x3 ({inputs[0]['values']})"
    else:
        shown = "inputs " + ", ".join(f"{i['name']} {i['shape'][0]}x{i['shape'][1]}x3" for i in inputs) + \
            f" ({inputs[0]['values'].split(' (')[0]}, each resized by Pillow as extracted)"
    click.echo(f"exported {run_dir} -> {out}: {shown}, "
               f"output probabilities of {', '.join(map(_safe, result['class_names']))}")
    kind = result["format"] + (f" {result['quantize']}" if result["quantize"] != "none" else "")
    click.echo(f"  {kind}, {result['bytes'] / 2**20:.2f} MiB; labels {result['labels']}; model card {result['card']}")
    test = result["exported_test"]
    if test["measured"]:
        line = f"  test accuracy of the exported model {test['accuracy']:.4f} (n={test['n']})"
        if result["run_test_accuracy"] is not None:
            line += f"; the run's {result['run_test_accuracy']:.4f}"
        reference = test.get("float_model")
        if reference:
            line += (f"; float model on the same images {reference['accuracy']:.4f}, "
                     f"top-1 agreement {reference['top1_agreement']:.4f}")
        click.echo(line)
    for warning in result["warnings"]:
        click.echo(f"  warning: {_safe(warning)}", err=True)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), help="The HTML file [default: RUN_DIR/report.html, replaced if there].")
@click.option("--split", type=click.Choice(["test", "validation", "train"]), help="Split whose mistakes and map are shown [default: test, or validation if test is empty].")
@click.option("--max-images", type=click.IntRange(min=0), default=100, show_default=True, help="Thumbnails of mistakes at most (the rest are listed by path).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the map (PCA and t-SNE).")
@_trust_pickle_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def report(run_dir, out, split, max_images, seed, trust_pickle, as_json):
    """Write one self-contained HTML page of RUN_DIR: metrics, mistakes, a map of the features."""
    result = api.report(run_dir, out=out, split=split, max_images=max_images, seed=seed, trust_pickle=trust_pickle)
    if as_json:
        _emit_json(result)
        return
    _print_report(result)


def _echo_splits(result: dict, timing: str = "") -> None:
    """A trained run's lines: metrics per split, its run directory and report."""
    for split in ("train", "validation", "test"):
        m = result[split]
        click.echo(f"  {split:<11} n={m['n']:<6} accuracy {_fmt(m['accuracy'])} loss {_fmt(m['loss'])}")
    click.echo(f"  {timing}run directory {result['run_dir']}")
    if result.get("report"):
        click.echo(f"  report {result['report']}")


def _print_report(result: dict) -> None:
    if result["per_image"]:
        click.echo(f"report {result['report']}: {result['mistakes']} mistakes of {result['images']} {result['split']} images "
                   f"({result['mistake_thumbnails']} thumbnails), map of {result['map_points']} points")
    else:
        click.echo(f"report {result['report']}: recorded metrics only")
    for note in result["notes"]:
        click.echo(f"  note: {_safe(note)}", err=True)


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(), required=True, help="New run directory of the ensemble.")
@click.option("--weights", type=click.Choice(["equal", "fit"]), default="equal", show_default=True,
              help="equal: 1/M each; fit: non-negative weights summing to 1 that minimise the validation log loss.")
@click.option("--no-report", is_flag=True, help="Do not write RUN_DIR/report.html (see `featcache report`).")
@_trust_pickle_option
@_exclude_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def ensemble(run_dirs, out, weights, no_report, trust_pickle, exclude, as_json):
    """Average the class probabilities of RUN_DIRs trained on the same images; write the run directory --out."""
    result = api.ensemble(list(run_dirs), out=out, weights=weights, no_report=no_report, trust_pickle=trust_pickle,
                          exclude=exclude)
    if as_json:
        _emit_json(result)
        return
    fit = result["fit"]
    how = (f"weights fit on validation (log loss {fit['validation_loss_equal']:.4f} equal -> "
           f"{fit['validation_loss_fitted']:.4f} fitted)" if fit else "equal weights")
    click.echo(f"ensemble of {len(result['members'])} runs, {how}")
    click.echo(f"  {'weight':>7} {'val acc':>8} {'val loss':>8} {'test acc':>8} {'test loss':>9}  run")
    for m in result["members"]:
        v, t = m["validation"], m["test"]
        click.echo(f"  {m['weight']:>7.4f} {_fmt(v['accuracy']):>8} {_fmt(v['loss']):>8} {_fmt(t['accuracy']):>8} "
                   f"{_fmt(t['loss']):>9}  {_safe(m['run_dir'])} ({_safe(m['label'])})")
    _echo_splits(result)
    for warning in result["warnings"]:
        click.echo(f"  warning: {_safe(warning)}", err=True)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(), metavar="[IMAGE_DIR] RUN_DIR")
@click.option("--out", type=click.Path(), required=True, help="New run directory of the fine-tuned model.")
@click.option("--unfreeze", default="top", show_default=True, metavar="none|top|from:LAYER|all",
              help="What of the base trains with the head: none (base frozen, head on images), top (the registry's top "
                   "block), from:LAYER (every layer from LAYER on), all (the whole base). BatchNormalization stays frozen "
                   "(except all on a --weights none base: training from scratch).")
@click.option("--unfreeze-from", metavar="LAYER", help="Same as --unfreeze from:LAYER (older spelling).")
@click.option("--blocks", type=click.IntRange(min=1), default=1, show_default=True, help="Top blocks to unfreeze (the registry names one).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True, help="Learning rate (RMSprop).")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--augment", metavar="LIST", help="Augment training images: comma list of flip, rotation, zoom, translation, contrast (NAME=STRENGTH to change one), or all.")
@click.option("--aug-seed", type=int, default=0, show_default=True, help="Seed of the augmentation.")
@click.option("--from-cache", type=click.Path(), metavar="STORE.h5", help="Train from the boundary activations in this store (extract --layer BOUNDARY); no images decoded.")
@click.option("--weights", help="Weights file of the base, if it moved since extraction [default: as recorded].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of shuffling and dropout.")
@click.option("--no-report", is_flag=True, help="Do not write RUN_DIR/report.html (see `featcache report`).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def finetune(paths, out, no_report, as_json, **options):
    """Train the dense head of a stage-two RUN_DIR with none, the top block, part or all of its base.

    IMAGE_DIR defaults to the image folder recorded in the run; with --from-cache no images are read."""
    if len(paths) > 2:
        raise FeatcacheError("finetune: expected [IMAGE_DIR] RUN_DIR")
    image_dir, run_dir = (None, paths[0]) if len(paths) == 1 else paths
    result = api.finetune(run_dir, out=out, image_dir=image_dir, no_report=no_report, **options)
    if as_json:
        _emit_json(result)
        return
    layers = result["trainable_layers"]
    shown = ("head only (base frozen)" if not layers else
             f"layers {', '.join(layers)} + head" if len(layers) <= 6 else
             f"{len(layers)} base layers ({layers[0]} ... {layers[-1]}) + head")
    click.echo(f"fine-tuned {result['feature_set']} (--unfreeze {result['unfreeze']}) from {result['source']}: {shown}")
    for split in ("train", "validation", "test"):
        m, b = result[split], result["before"].get(split, {})
        click.echo(f"  {split:<11} n={m['n']:<6} accuracy {_fmt(b.get('accuracy'))} -> {_fmt(m['accuracy'])} "
                   f"loss {_fmt(b.get('loss'))} -> {_fmt(m['loss'])}")
    click.echo(f"  {result['epochs']} epochs in {result['seconds']:.1f} s; run directory {result['run_dir']}")
    if result.get("report"):
        click.echo(f"  report {result['report']}")


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--feature-set", help="Feature set name (see `featcache info`).")
@click.option("--base", help="Use the only feature set of this base instead of naming one.")
@click.option("--out", type=click.Path(file_okay=False), metavar="DIR",
              help="New folder: audit.html, audit.json, CSV files and exclude.txt (for train --exclude).")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Folds of the out-of-fold probabilities.")
@click.option("--run", type=click.Path(), help="Refit this run's head kind and settings (dense, logreg or knn) on each fold [default: logistic regression, C=0.01].")
@click.option("--threshold", type=click.FloatRange(0, 1), help="Cosine similarity from which two images are near duplicates [default: per base family].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds.")
@click.option("--fail-on-leaks", is_flag=True, help="Exit 1 when an image of validation or test has a twin in train.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def audit(store, feature_set, base, out, folds, run, threshold, seed, fail_on_leaks, as_json):
    """Check the data of STORE from its cached features: label issues, duplicates, train/test leaks, outliers."""
    result = api.audit(store, feature_set=feature_set, base=base, out=out, folds=folds, run=run,
                       threshold=threshold, seed=seed)
    if as_json:
        _emit_json(result)
    else:
        share = result["leak_share"]
        click.echo(f"audit of {result['feature_set']}: {result['rows']} rows in {result['seconds']:.1f} s")
        if result["labelled"]:
            click.echo(f"  label issues      {len(result['label_issues'])}")
        click.echo(f"  duplicate groups  {len(result['duplicates'])} "
                   f"({sum(d['exact'] for d in result['duplicates'])} exact)")
        click.echo(f"  leaks             {len(result['leaks'])} groups; {share['with_a_twin_in_train']} of "
                   f"{share['held_out_images']} validation/test images have a twin in train")
        click.echo(f"  outliers          {len(result['outliers'])}")
        for item in result["label_issues"][:10]:
            click.echo(f"  label? {_safe(item['path'])}: given {_safe(item['given'])}, suggested "
                       f"{_safe(item['suggested'])} ({item['score']:.3f})")
        for note in result["notes"]:
            click.echo(f"  note: {_safe(note)}", err=True)
        if result.get("files"):
            click.echo(f"  page {result['files']['audit.html']}; exclude list {result['files']['exclude.txt']}")
    sys.exit(1 if fail_on_leaks and result["leaks"] else 0)


@cli.command()
@click.argument("store", type=click.Path())
@click.argument("queries", nargs=-1, required=True)
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True, help="Neighbours per query.")
@click.option("--feature-set", help="Feature set name (see `featcache info`).")
@click.option("--base", help="Use the only feature set of this base instead of naming one.")
@click.option("--weights", help="Weights file of the base, if it moved since extraction (queries that are files).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def similar(store, queries, k, feature_set, base, weights, as_json):
    """The K stored images most like each QUERY: a stored image (its relative path) or any image file."""
    result = api.similar(store, list(queries), k=k, feature_set=feature_set, base=base, weights=weights)
    if as_json:
        _emit_json(result)
        return
    for r in result["results"]:
        click.echo(f"{_safe(r['query'])}:")
        for n in r["neighbors"]:
            label = f" [{_safe(n['label'])}]" if n["label"] is not None else ""
            click.echo(f"  {n['similarity']:.4f}  {_safe(n['path'])}{label} ({n['split'] or 'no split'})")


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def upgrade(run_dir, as_json):
    """Rewrite RUN_DIR's pickled model (model.joblib, from an older featcache) as arrays that load without
    running code (model.npz), checked by predicting its test split before and after."""
    result = api.upgrade(run_dir)
    if as_json:
        _emit_json(result)
    elif result["upgraded"]:
        click.echo(f"upgraded {run_dir}: {result['from']} -> {result['to']}, the same probabilities on "
                   f"{_safe(result['checked_on'])}")
    else:
        click.echo(f"{run_dir}: nothing to upgrade ({result['from'] or 'no model file'} holds no pickle)")


def main():
    if "--debug" not in sys.argv:
        from .quiet_tf import install

        install()  # TensorFlow's start-up notices are noise on a command line
    cli(prog_name="featcache")


if __name__ == "__main__":
    main()
