"""What the values of a feature set's columns must satisfy: checked whenever a column is read,
so a damaged store that HDF5 cannot tell from a good one (written before checksums, or an
edit by another program) is refused instead of served. Each check names the first bad row."""
from __future__ import annotations

import numpy as np

from .damage import StoreDamaged
from .layout import SPLITS, UNKNOWN_SIZE

_IS_HEX = np.zeros(256, bool)  # a look-up per byte (np.isin sorted 64 bytes a row)
_IS_HEX[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = True
_SPLIT_VALUES = np.array([s.encode() for s in SPLITS] + [b""], dtype="S10")


def check_counter(values: np.ndarray, path: str, name: str) -> tuple[int, int, int]:
    """(rows, failures, listing) of a ``committed`` counter."""
    if values.shape != (3,) or np.any(values < 0):
        raise StoreDamaged(path, "committed counter", f"holds {values.tolist()}", name)
    return tuple(int(v) for v in values)


def bad_values(column: str, values: np.ndarray, n_classes: int) -> np.ndarray | None:
    """A mask of the values a row column cannot hold (None: the column has no rule)."""
    if column == "labels":
        return (values < -1) | (values >= n_classes)  # -1: a row not in the latest listing
    if column == "digests":
        if values.dtype.itemsize != 64:
            return np.ones(len(values), bool)
        codes = np.frombuffer(values.tobytes(), np.uint8)
        if _IS_HEX[np.flatnonzero(np.bincount(codes, minlength=256))].all():  # one counting pass
            return np.zeros(len(values), bool)
        return ~_IS_HEX[codes.reshape(len(values), 64)].all(axis=1)
    if column == "splits":
        return ~np.isin(values, _SPLIT_VALUES)
    if column == "active":
        return values > 1
    if column == "file_sizes":
        return values < UNKNOWN_SIZE
    return None


_DETAIL = {"labels": "label {value}, not one of the {n} classes", "digests": "digest {value!r}, not 64 hex digits",
           "splits": "split {value!r}", "active": "active flag {value}",
           "file_sizes": "file size {value}"}


def check_column(column: str, values: np.ndarray, n_classes: int, path: str, name: str) -> np.ndarray:
    """``values`` of a row column as read; StoreDamaged at the first value it cannot hold."""
    bad = bad_values(column, values, n_classes)
    first = np.flatnonzero(bad) if bad is not None else ()
    if len(first):
        row = int(first[0])
        value = values[row].tobytes().decode("ascii", "replace") if values.dtype.kind == "S" else int(values[row])
        raise StoreDamaged(path, f"{column} column",
                           f"row {row} has " + _DETAIL[column].format(value=value, n=n_classes), name)
    return values


def check_active_rows(labels: np.ndarray, splits: np.ndarray, active: np.ndarray, labelled: bool, path: str,
                      name: str) -> None:
    """Rows of the dataset (active) need a class and a split, except in an unlabeled feature set
    (a folder without classes: label -1 and no split)."""
    if not labelled:
        return
    bad = np.flatnonzero(active.astype(bool) & ((labels < 0) | (splits == "")))
    if len(bad):
        row = int(bad[0])
        raise StoreDamaged(path, "row columns", f"active row {row} has label {int(labels[row])} and split "
                           f"{splits[row]!r}", name)
