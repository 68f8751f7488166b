"""Label issues by confident learning (Northcutt, Jiang, Chuang, JAIR 2021), on numpy.

cleanlab implements the method, but it is AGPL-3.0, which does not suit a library that others
embed (featcache is Apache-2.0); the method itself is a few array operations:

1. out-of-fold probabilities: every labelled row scored by a model that did not see it (K-fold);
2. per-class thresholds t_j: the mean probability of class j over the rows labelled j;
3. the confident joint C[i, j]: rows labelled i whose probability of j reaches t_j (the most
   probable such j when several do), counted per (given, likely) pair;
4. calibrated to the given labels' counts (each row of C rescaled to the number labelled i);
5. pruning by noise rate: for every off-diagonal (i, j), the C[i, j] rows labelled i with the
   largest margin p_j - p_i are label issues.

Issues are ranked by self-confidence (the probability of the given label, lowest first), each
with its suggested class (the most probable other class).

The out-of-fold model learns from the labels it is checking, wrong ones included, so
:func:`audit_labels` runs two rounds (prune, then refit, as confident learning's authors retrain
on the cleaned set): the suspects of a first round, found on the average of its out-of-fold
probabilities and the votes of each row's nearest neighbours (a second, independent opinion
that the audit's neighbour search has already paid for), are kept out of every fold's training
in the second round, whose probabilities alone make the answer. On cats vs dogs (MobileNetV2@160,
100 of 2,000 train labels moved; benchmarks/audit.py --photos --replant 17) one round found 0.86
of the moved labels at 0.72 precision on the benchmark's planting (0.875 at 0.73 over 18
plantings), two rounds 0.91 at 0.77 (0.911 at 0.77).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FeatcacheError

DEFAULT_FOLDS = 5
# Nearest neighbours whose labels vote in the first round (measured with 10; see the docstring).
VOTE_NEIGHBOURS = 10
ROUNDS_TEXT = (f"in two rounds (the second trained without the suspects of the first, found with the labels "
               f"of each row's {VOTE_NEIGHBOURS} nearest neighbours)")


@dataclass
class LabelIssues:
    rows: np.ndarray  # positions of the issues, worst (lowest self-confidence) first
    suggested: np.ndarray  # suggested class of each issue
    quality: np.ndarray  # (N,) self-confidence of every row: p[given]
    confident_joint: np.ndarray  # (K, K) calibrated counts, given x likely
    thresholds: np.ndarray  # (K,) per-class thresholds


def thresholds(labels: np.ndarray, proba: np.ndarray) -> np.ndarray:
    k = proba.shape[1]
    return np.array([proba[labels == j, j].mean() if np.any(labels == j) else 1.0 for j in range(k)])


def confident_joint(labels: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated confident joint (K, K) float, thresholds (K,))."""
    k = proba.shape[1]
    t = thresholds(labels, proba)
    above = proba >= t - 1e-12  # (N, K): confidently class j
    masked = np.where(above, proba, -np.inf)
    likely = masked.argmax(axis=1)
    counted = above.any(axis=1)
    joint = np.zeros((k, k))
    np.add.at(joint, (labels[counted], likely[counted]), 1)
    given = np.bincount(labels, minlength=k).astype(float)
    totals = joint.sum(axis=1, keepdims=True)
    calibrated = np.divide(joint, totals, out=np.zeros_like(joint), where=totals > 0) * given[:, None]
    return calibrated, t


def find_label_issues(labels: np.ndarray, proba: np.ndarray) -> LabelIssues:
    labels = np.asarray(labels, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    n, k = proba.shape
    joint, t = confident_joint(labels, proba)
    quality = proba[np.arange(n), labels]
    flagged = np.zeros(n, bool)
    for i in range(k):
        mine = np.flatnonzero(labels == i)
        for j in range(k):
            if i == j or not len(mine):
                continue
            count = int(round(joint[i, j]))
            if count <= 0:
                continue
            margin = proba[mine, j] - proba[mine, i]
            worst = mine[np.argsort(-margin, kind="stable")[:count]]
            flagged[worst] = True
    rows = np.flatnonzero(flagged)
    rows = rows[np.argsort(quality[rows], kind="stable")]
    others = proba.copy()
    others[np.arange(n), labels] = -1.0
    return LabelIssues(rows, others.argmax(axis=1)[rows], quality, joint, t)


def neighbour_votes(labels: np.ndarray, neighbours: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, K): the share of each class among each row's nearest other rows (``neighbours``: (N, k)
    positions, -1 where none was found); uniform for a row with none."""
    found = neighbours >= 0
    votes = np.zeros((len(labels), num_classes))
    for j in range(num_classes):
        votes[:, j] = np.sum(found & (labels[np.maximum(neighbours, 0)] == j), axis=1)
    counted = votes.sum(axis=1, keepdims=True)
    return np.divide(votes, counted, out=np.full_like(votes, 1.0 / num_classes), where=counted > 0)


def audit_labels(x: np.ndarray, labels: np.ndarray, neighbours: np.ndarray, folds: int = DEFAULT_FOLDS,
                 seed: int = 0, make_model=None) -> tuple[LabelIssues, np.ndarray]:
    """(the label issues, the (N, K) out-of-fold probabilities they were found on): two rounds,
    the second trained without the first's suspects (see the module's docstring).
    ``neighbours``: (N, >= VOTE_NEIGHBOURS) positions of each row's nearest others, best first."""
    labels = np.asarray(labels, dtype=np.int64)
    first = out_of_fold(x, labels, folds, seed, make_model)
    blended = (first + neighbour_votes(labels, neighbours[:, :VOTE_NEIGHBOURS], first.shape[1])) / 2
    suspects = np.zeros(len(labels), bool)
    suspects[find_label_issues(labels, blended).rows] = True
    second = out_of_fold(x, labels, folds, seed, make_model, left_out=suspects)
    return find_label_issues(labels, second), second


def out_of_fold(x: np.ndarray, labels: np.ndarray, folds: int = DEFAULT_FOLDS, seed: int = 0,
                make_model=None, left_out: np.ndarray | None = None) -> np.ndarray:
    """(N, K) probabilities, each row from a model fitted on the other folds (stratified).
    ``make_model``: a scikit-learn-style classifier factory; default: standardized logistic regression.
    ``left_out``: (N,) bool, rows no fold trains on (they are still scored)."""
    from sklearn.model_selection import StratifiedKFold

    k = int(labels.max()) + 1 if len(labels) else 0
    smallest = np.bincount(labels, minlength=k).min() if len(labels) else 0
    if len(labels) < folds or smallest < 2:
        raise FeatcacheError(f"{len(labels)} labelled rows (the smallest class has {smallest}): out-of-fold "
                             f"probabilities need at least {folds} rows and 2 of each class (use fewer --folds)")
    if make_model is None:
        make_model = default_model
    proba = np.zeros((len(labels), k))
    splitter = StratifiedKFold(n_splits=min(folds, int(smallest)) if smallest < folds else folds, shuffle=True,
                               random_state=seed)
    for train, test in splitter.split(x, labels):
        if left_out is not None:
            kept = train[~left_out[train]]
            # a fold keeps them when leaving them out would leave it a single class to learn
            train = kept if len(np.unique(labels[kept])) > 1 else train
        model = make_model()
        model.fit(x[train], labels[train])
        p = np.zeros((len(test), k))
        p[:, model.classes_] = model.predict_proba(x[test])
        proba[test] = p
    return proba


# The out-of-fold model's inverse L2 strength. Strongly regularized, its probabilities are less
# overconfident, which is what the per-class thresholds need: on cats vs dogs (MobileNetV2@160,
# 100 of 2,000 train labels moved, benchmarks/audit.py) C=1 found 92% of them at 36% precision,
# C=0.01 86% at 72%, C=0.005 88% at 77%.
DEFAULT_C = 0.01


def default_model(C: float = DEFAULT_C, max_iter: int = 1000, seed: int = 0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
