"""Metrics, sanity flags and plots: the same for every head (scikit-learn metrics, matplotlib)."""
from __future__ import annotations

import csv
import math

import numpy as np

# The untrained head's loss is flagged outside [LOW, HIGH] x ln(K): a far-off start usually
# means unscaled features or a broken head, and it makes the first epochs meaningless.
UNTRAINED_LOSS_LOW, UNTRAINED_LOSS_HIGH = 0.5, 1.5
# Overfitting: validation loss has not improved for this share of the epochs (at least 3)
# while training loss went on falling. Heads without epochs: train - validation accuracy gap.
OVERFIT_PATIENCE_SHARE, OVERFIT_MIN_PATIENCE, OVERFIT_GAP = 0.2, 3, 0.1


def _normalized(proba: np.ndarray) -> np.ndarray:
    proba = np.asarray(proba, dtype=np.float64)
    return proba / proba.sum(axis=1, keepdims=True)


def score(y: np.ndarray, proba: np.ndarray, num_classes: int) -> dict:
    """Accuracy and log loss (natural log, mean over rows) only."""
    from sklearn.metrics import accuracy_score, log_loss

    if len(y) == 0:
        return {"n": 0, "accuracy": None, "loss": None}
    proba = _normalized(proba)
    return {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, proba.argmax(axis=1))),
        "loss": float(log_loss(y, proba, labels=list(range(num_classes)))),
    }


def metrics(y: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict:
    """score() plus confusion matrix (rows: true class, columns: predicted) and per-class
    precision/recall/F1 (scikit-learn's classification_report)."""
    from sklearn.metrics import classification_report, confusion_matrix

    k = len(class_names)
    result = score(y, proba, k)
    if result["n"] == 0:
        return result
    pred = _normalized(proba).argmax(axis=1)
    result["confusion_matrix"] = confusion_matrix(y, pred, labels=list(range(k))).tolist()
    result["per_class"] = classification_report(
        y, pred, labels=list(range(k)), target_names=class_names, output_dict=True, zero_division=0)
    return result


def summary(m: dict | None) -> dict:
    """{n, accuracy, loss} of one split's metrics (n 0 when the split is empty): what --json prints."""
    m = m or {"n": 0, "accuracy": None, "loss": None}
    return {"n": m["n"], "accuracy": m["accuracy"], "loss": m["loss"]}


def untrained_check(scores: dict, num_classes: int) -> dict:
    """Compare the untrained head with chance: accuracy ~ 1/K, loss ~ ln(K)."""
    expected = math.log(num_classes)
    out = {**scores, "chance_accuracy": 1.0 / num_classes, "expected_loss": expected, "flag": False, "reason": ""}
    if scores.get("loss") is None:
        return out
    ratio = scores["loss"] / expected
    if not UNTRAINED_LOSS_LOW <= ratio <= UNTRAINED_LOSS_HIGH:
        out["flag"] = True
        out["reason"] = (f"untrained loss {scores['loss']:.3f} is {ratio:.2f} x ln({num_classes}) = {expected:.3f} "
                         f"(expected {UNTRAINED_LOSS_LOW}-{UNTRAINED_LOSS_HIGH} x): features may be unscaled "
                         "or the head badly initialised")
    return out


def overfitting(history: dict, train_accuracy=None, validation_accuracy=None) -> dict:
    """Flag a run whose validation loss stopped improving while its training loss kept falling."""
    loss, val_loss = history.get("loss", []), history.get("val_loss", [])
    if len(val_loss) >= OVERFIT_MIN_PATIENCE and len(loss) == len(val_loss):
        epochs = len(val_loss)
        best = int(np.argmin(val_loss))
        since = epochs - 1 - best
        patience = max(OVERFIT_MIN_PATIENCE, math.ceil(OVERFIT_PATIENCE_SHARE * epochs))
        flag = since >= patience and loss[-1] < loss[best]
        reason = (f"validation loss best at epoch {best + 1} of {epochs} ({val_loss[best]:.4f}, now {val_loss[-1]:.4f}) "
                  f"while training loss fell from {loss[best]:.4f} to {loss[-1]:.4f}") if flag else ""
        return {"flag": bool(flag), "method": "curves", "best_epoch": best + 1, "epochs_since_best": since,
                "patience": patience, "reason": reason}
    if train_accuracy is None or validation_accuracy is None:
        return {"flag": False, "method": "none", "reason": "no validation data"}
    gap = train_accuracy - validation_accuracy
    flag = gap > OVERFIT_GAP
    reason = (f"train accuracy {train_accuracy:.3f} vs validation {validation_accuracy:.3f} "
              f"(gap {gap:.3f} > {OVERFIT_GAP})") if flag else ""
    return {"flag": bool(flag), "method": "gap", "gap": float(gap), "reason": reason}


def write_history(history: dict, path: str) -> None:
    """history.csv: one row per epoch, the columns Keras' CSVLogger writes."""
    columns = sorted(history)
    epochs = max((len(v) for v in history.values()), default=0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", *columns])
        for i in range(epochs):
            writer.writerow([i, *(history[c][i] if i < len(history[c]) else "" for c in columns)])


def plot_curves(history: dict, path: str, title: str) -> bool:
    """Loss and accuracy per epoch, train vs validation. False (no file) for fewer than 2 epochs."""
    if len(history.get("loss", [])) < 2:
        return False
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI

    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            if history.get(key):
                ax.plot(range(1, len(history[key]) + 1), history[key], marker=".", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return True


def plot_confusion(matrix, class_names: list[str], path: str, title: str) -> None:
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    k = len(class_names)
    fig = Figure(figsize=(max(4, 0.6 * k + 3), max(3.5, 0.6 * k + 2.5)), layout="constrained")
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=class_names).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45 if k > 4 else "horizontal")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=100)
