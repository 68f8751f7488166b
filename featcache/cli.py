"""The command line: one thin click command per task. No logic lives here.

Imports of TensorFlow and of the stage packages happen inside the commands, so
``featcache --help``, ``bases`` and ``info`` stay instant.
"""
from __future__ import annotations

import json
import sys

import click

from . import __version__
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


def _safe(text: str) -> str:
    """Strings from files and stores, printable: control characters escaped."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


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
@click.option("--base", default="vgg16", show_default=True, help="Backbone name (see `featcache bases`).")
@click.option("--size", type=int, help="Square input size [default: the base's default].")
@click.option("--weights", default="imagenet", show_default=True, help="imagenet, none (random init) or a path to a .h5 file.")
@click.option("--layer", help="Layer whose output is cached [default: the last conv output].")
@click.option("--pooling", type=click.Choice(["none", "avg", "max"]), default="none", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True, help="Storage dtype.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True, help="Compute precision of the base.")
@click.option("--resize", default="bilinear", show_default=True, help="Resize method (nearest, bilinear, bicubic, lanczos, box; +jpeg-draft for DCT downscale).")
@click.option("--split", "split_fractions", default="0.8,0.1,0.1", show_default=True, help="train,validation,test fractions when the folder has no split folders.")
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random init (--weights none).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=100_000_000, show_default=True, help="Refuse images with more pixels than this, before decoding.")
@click.option("--follow-symlinks", is_flag=True, help="Follow symlinks that leave IMAGE_DIR.")
@click.option("--strict", is_flag=True, help="Exit non-zero if any image failed.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def extract(image_dir, store, split_fractions, strict, no_progress, as_json, **options):
    """Extract features of IMAGE_DIR (one subfolder per class) into STORE (HDF5)."""
    from .extract.pipeline import ExtractConfig, extract as run_extract

    try:
        fractions = tuple(float(x) for x in split_fractions.split(","))
        assert len(fractions) == 3
    except (ValueError, AssertionError):
        raise FeatcacheError(f"--split {split_fractions!r}: expected three fractions like 0.8,0.1,0.1") from None
    config = ExtractConfig(split_fractions=fractions, progress=not no_progress, **options)
    result = run_extract(image_dir, store, config)
    if as_json:
        _emit_json(result)
    else:
        _print_extract(result)
    nothing = result["extracted"] + result["reused"] == 0
    sys.exit(1 if nothing or (strict and result["failed"]) else 0)


def _print_extract(result: dict) -> None:
    click.echo(f"feature set {result['feature_set']}: shape {tuple(result['shape'])}")
    click.echo(
        f"  extracted {result['extracted']}, reused {result['reused']}, failed {result['failed']} "
        f"in {result['seconds']:.1f} s ({result['images_per_second']:.1f} images/s)"
    )
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
    from .cache.store import open_store

    with open_store(store) as s:
        summaries = [s[name].summary() for name in s.feature_set_names()]
    if as_json:
        _emit_json({"store": store, "feature_sets": summaries})
        return
    if not summaries:
        click.echo(f"{store}: no feature sets")
    for fs in summaries:
        click.echo(f"{fs['feature_set']}  shape {tuple(fs['shape'])} {fs['dtype']}")
        click.echo("  key: " + ", ".join(f"{k}={_safe(str(v))}" for k, v in fs["key"].items()))
        for split, counts in fs["counts"].items():
            click.echo(f"  {split:<10} " + "  ".join(f"{_safe(c)}={n}" for c, n in counts.items()))
        if fs["rows_stored"] != fs["rows_active"]:
            click.echo(f"  rows stored {fs['rows_stored']} (not in the current listing: {fs['rows_stored'] - fs['rows_active']})")
        for item in fs["failures"]:
            click.echo(f"  failed: {_safe(item['path'])}: {_safe(item['reason'])}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def bases(as_json):
    """List the backbone registry."""
    from dataclasses import asdict

    from .extract.backbones import REGISTRY

    rows = [asdict(b) for b in REGISTRY.values()]
    if as_json:
        _emit_json(rows)
        return
    for b in REGISTRY.values():
        click.echo(f"{b.name:<22} size {b.default_size:<4} preprocessing {b.preprocessing:<7} top block {','.join(b.top_block) or '-'}")


def main():
    import os

    # TensorFlow's C++ start-up chatter (oneDNN notices, CPU flags) is noise on a CLI.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cli(prog_name="featcache")


if __name__ == "__main__":
    main()
