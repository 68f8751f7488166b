"""Image discovery: class-per-folder trees, splits, the class index map."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ...errors import FeatcacheError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
from ..defaults import SPLIT_FRACTIONS as DEFAULT_FRACTIONS


UNLABELED = -1  # the label of an image from a folder without classes (and of a row no longer listed)
NO_SPLIT = ""  # the split of an unlabeled image: splits are for training, which needs labels


class ImageEntry(NamedTuple):  # a tuple: a million of them are built per listing, at a third of a dataclass's cost
    relpath: str  # relative to the image root, "/"-separated
    label: int  # index into the listing's class_names, or UNLABELED
    split: str  # "train", "validation" or "test"; NO_SPLIT when unlabeled


@dataclass
class Listing:
    root: str
    class_names: list[str]
    entries: list[ImageEntry]
    split_source: str  # "folders" (train/validation/test), "hash" (stable split by path) or "unlabeled"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, why not used)
    warnings: list[str] = field(default_factory=list)
    # Each entry's os.stat_result (None: stat failed) taken by the walk, when asked for
    # (stat_files): filestat.stat_listing uses them instead of a second pass of stat calls.
    file_stats: list | None = None

    def path(self, entry: ImageEntry) -> str:
        if os.sep == "/":  # relpaths are "/"-separated already: os.path.join's result, without its cost per file
            root = self.root
            return root + entry.relpath if not root or root.endswith("/") else f"{root}/{entry.relpath}"
        return os.path.join(self.root, *entry.relpath.split("/"))


def hash_split(relpath: str, fractions=DEFAULT_FRACTIONS, seed: int = 0) -> str:
    """Split from a hash of the relative path: adding images never moves existing ones."""
    return hash_splits([relpath], fractions, seed)[0]


def hash_splits(relpaths: list[str], fractions=DEFAULT_FRACTIONS, seed: int = 0) -> list[str]:
    """:func:`hash_split` of each path: the hashes one C call each, the thresholds in numpy
    (a million paths in about a second, where a call per path took several)."""
    sha256, prefix = hashlib.sha256, f"{seed}:"
    heads = b"".join([sha256((prefix + r).encode("utf-8", "surrogateescape")).digest()[:8] for r in relpaths])
    u = np.frombuffer(heads, ">u8") / 2**64
    train, validation, _ = fractions
    names = np.array(["train", "validation", "test"], dtype=object)
    return names[(u >= train).astype(np.int8) + (u >= train + validation)].tolist()


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _inside(real_root: str, path: str) -> bool:
    target = os.path.realpath(path)
    return os.path.commonpath([real_root, target]) == real_root


def _identity(folder: str):
    """What tells a folder reached twice (through a symlink): its device and inode."""
    try:
        st = os.stat(folder)
        return st.st_dev, st.st_ino
    except OSError:
        return os.path.realpath(folder)


def _walk_class_folder(root: str, class_dir: str, follow_symlinks: bool, skipped: list,
                       file_stats: list | None = None) -> list[str]:
    """Image paths (relative to root) under one class folder, recursively.

    Symlinks inside IMAGE_DIR are followed; ones that lead out of it only with
    ``follow_symlinks``. A folder reached twice (a symlink loop) is listed once.

    A walk with os.scandir, folder by folder in os.walk's order (a folder's subfolders, then its
    files, sorted; then each kept subfolder): each file costs a string concatenation and the
    file type scandir already has, with no per-file relpath, realpath or lstat (only a symlinked
    file is resolved), which is what listing a million files costs in Python. ``file_stats``:
    a list to append each listed file's stat to, in the order of the paths returned."""
    real_root = os.path.realpath(root)

    def rel(path: str) -> str:
        return os.path.relpath(path, root).replace(os.sep, "/")

    leaves = "symlink leaves the image folder (use --follow-symlinks to allow)"
    if not follow_symlinks and not _inside(real_root, class_dir):
        skipped.append((rel(class_dir), leaves))
        return []
    visited = {_identity(class_dir)}
    found: list[str] = []
    stack = [(class_dir, rel(class_dir))]
    while stack:
        folder, prefix = stack.pop()
        prefix = "" if prefix == "." else prefix + "/"
        try:
            with os.scandir(folder) as it:
                children = list(it)
        except OSError as exc:  # os.walk would drop these silently
            skipped.append((rel(exc.filename or folder), f"cannot list folder ({exc.strerror or exc})"))
            continue
        dirs, files = [], []
        for child in children:
            try:
                is_dir = child.is_dir()  # follows a symlink, as os.walk(followlinks=True) does
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(child)
        keep = []
        for d in sorted(dirs, key=lambda c: c.name):
            if _is_hidden(d.name):
                continue
            # A real subfolder of a folder inside is inside: only a symlink is resolved (realpath
            # costs an lstat per path component, 1.3 s per 10,000 folders).
            if not follow_symlinks and d.is_symlink() and not _inside(real_root, d.path):
                skipped.append((prefix + d.name, leaves))
                continue
            real = _identity(d.path)
            if real in visited:
                skipped.append((prefix + d.name, "symlink loop (this folder is already listed)"))
                continue
            visited.add(real)
            keep.append((d.path, prefix + d.name))
        for f in sorted(files, key=lambda c: c.name):
            name = f.name
            if name[0] == ".":  # hidden (_is_hidden, inline: this runs once per file)
                continue
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                skipped.append((prefix + name, f"not an image file name ({os.path.splitext(name)[1] or 'no extension'})"))
                continue
            # Every folder walked is inside (checked above), so only a symlinked file can lead out.
            if not follow_symlinks and f.is_symlink() and not _inside(real_root, f.path):
                skipped.append((prefix + name, leaves))
                continue
            found.append(prefix + name)
            if file_stats is not None:
                try:
                    file_stats.append(f.stat())  # follows a symlink, as reading the file does
                except OSError:
                    file_stats.append(None)
        stack.extend(reversed(keep))  # depth first, in sorted order
    return found


def _class_dirs(folder: str) -> list[str]:
    return sorted(
        d for d in os.listdir(folder) if not _is_hidden(d) and os.path.isdir(os.path.join(folder, d))
    )


def discover(
    root: str, fractions=DEFAULT_FRACTIONS, split_seed: int = 0, follow_symlinks: bool = False,
    unlabeled: bool = False, stat_files: bool = False,
) -> Listing:
    """List the images of a class-per-folder tree, sorted, with labels and splits.

    If the root holds only train/ and validation/ (or val/) and/or test/ folders, those are
    the splits; otherwise each image's split comes from a hash of its relative path.

    A folder whose images sit directly in it (no subfolders), or any tree with ``unlabeled``,
    is listed without labels: every image below the root, label UNLABELED, split NO_SPLIT.
    ``stat_files``: also stat each file as it is listed (Listing.file_stats).
    """
    if not os.path.exists(root):
        raise FeatcacheError(f"{root}: image folder does not exist")
    if not os.path.isdir(root):
        raise FeatcacheError(f"{root}: not a folder (expected one subfolder of images per class, "
                             "or images for --unlabeled)")
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions):
        raise FeatcacheError(f"split fractions {fractions} must be non-negative and sum to 1")
    top = _class_dirs(root)
    if unlabeled or not top:
        return _discover_unlabeled(root, follow_symlinks, asked=unlabeled, stat_files=stat_files)
    skipped: list[tuple[str, str]] = []
    warnings: list[str] = []
    loose = sorted(
        f for f in os.listdir(root) if not _is_hidden(f) and os.path.isfile(os.path.join(root, f))
    )
    skipped += [(f, "file directly in the image folder, not in a class folder (--unlabeled lists every image)")
                for f in loose]

    split_mode = bool(top) and "train" in top and set(top) <= set(SPLIT_FOLDERS)
    per_split: list[tuple[str | None, str]] = (
        [(SPLIT_FOLDERS[d], os.path.join(root, d)) for d in top] if split_mode else [(None, root)]
    )
    class_names = sorted({c for _, folder in per_split for c in _class_dirs(folder)})
    if not class_names:
        raise FeatcacheError(f"{root}: no class folders found (expected one subfolder of images per class)")
    index = {name: i for i, name in enumerate(class_names)}

    entries, file_stats = [], [] if stat_files else None
    for split, folder in per_split:
        for name in _class_dirs(folder):
            rels = _walk_class_folder(root, os.path.join(folder, name), follow_symlinks, skipped, file_stats)
            splits = [split] * len(rels) if split else hash_splits(rels, fractions, split_seed)
            label = index[name]
            entries += [ImageEntry(rel, label, s) for rel, s in zip(rels, splits)]
    entries, file_stats = _sorted(entries, file_stats)

    counts = {name: 0 for name in class_names}
    for e in entries:
        counts[class_names[e.label]] += 1
    for name, n in counts.items():
        if n == 0:
            warnings.append(f"class folder {name!r} holds no images")
    if len(class_names) == 1:
        warnings.append(f"only one class ({class_names[0]!r}): a classifier needs at least two")
    if not entries:
        raise FeatcacheError(f"{root}: no images found in the class folders ({', '.join(IMAGE_EXTENSIONS)})")
    return Listing(root, class_names, entries, "folders" if split_mode else "hash", skipped, warnings, file_stats)


def _sorted(entries: list[ImageEntry], file_stats: list | None):
    """``entries`` sorted by path, and ``file_stats`` (None: not taken) in the same order."""
    if file_stats is None:
        return sorted(entries), None  # by relpath: each path is listed once
    order = sorted(range(len(entries)), key=entries.__getitem__)
    return [entries[i] for i in order], [file_stats[i] for i in order]


def _discover_unlabeled(root: str, follow_symlinks: bool, asked: bool, stat_files: bool = False) -> Listing:
    """Every image below ``root``, sorted, without labels or splits (features and paths only)."""
    skipped: list[tuple[str, str]] = []
    file_stats = [] if stat_files else None
    relpaths = _walk_class_folder(root, root, follow_symlinks, skipped, file_stats)
    if not relpaths:
        raise FeatcacheError(
            f"{root}: no images found ({', '.join(IMAGE_EXTENSIONS)})" if asked else
            f"{root}: no class folders and no images found (expected one subfolder of images per class, "
            "or images to extract unlabeled)")
    entries, file_stats = _sorted([ImageEntry(rel, UNLABELED, NO_SPLIT) for rel in relpaths], file_stats)
    return Listing(root, [], entries, "unlabeled", skipped, [], file_stats)


# -- shards: which images belong to shard I of N (see sharding.py) ------------------------------

SHARD_SALT = "featcache-shard"
_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"3/8"`` -> (3, 8); shards are numbered from 0."""
    match = _SHARD_RE.match(text or "")
    if not match:
        raise FeatcacheError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/8")
    return check_shard((int(match.group(1)), int(match.group(2))))


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise FeatcacheError(f"--shard {index}/{count}: expected I/N with 0 <= I < N (shards are numbered from 0)")
    return index, count


def shard_of(relpath: str, count: int) -> int:
    digest = hashlib.sha256(f"{SHARD_SALT}:{relpath}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


def select_shard(entries: list[ImageEntry], index: int, count: int) -> list[ImageEntry]:
    return [e for e in entries if shard_of(e.relpath, count) == index]
