"""The pictures of a report, as bytes to inline: curves and confusion matrix (drawn by
:mod:`.reports`, as in the run directory), the map of the features (scikit-learn PCA then
t-SNE, matplotlib), and image thumbnails (Pillow)."""
from __future__ import annotations

import base64
import io
import os

import numpy as np

from .. import evaluation as reports

# t-SNE settings: 4,000 points in well under 30 s on 2 cores (benchmarks/report.py). Fewer
# iterations than scikit-learn's 1,000 (the layout is settled by then on cached features) and
# PCA initialisation, which keeps the global layout stable from seed to seed.
PCA_DIMS = 50
TSNE_PERPLEXITY = 30.0
TSNE_MAX_ITER = 500
TSNE_MIN_POINTS = 5  # below this a t-SNE is meaningless: the map shows the first 2 PCA components
THUMB_QUALITY = 80


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def curves_png(history: dict, title: str) -> bytes | None:
    buf = io.BytesIO()
    return buf.getvalue() if reports.plot_curves(history, buf, title) else None


def confusion_png(matrix, class_names: list[str], title: str) -> bytes:
    buf = io.BytesIO()
    reports.plot_confusion(matrix, [_plain(n) for n in class_names], buf, title)
    return buf.getvalue()


def _plain(text: str) -> str:
    """matplotlib reads $...$ as math: class names are shown as they are."""
    return str(text).replace("$", r"\$")


def embed_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, 2) coordinates and how they were made: PCA to at most 50 dimensions, then t-SNE
    (seeded; perplexity lowered for small sets)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(features)
    if n == 0:
        return np.zeros((0, 2)), "no images"
    x = np.asarray(features, np.float32)
    dims = min(PCA_DIMS, n, x.shape[1])
    if dims < 2:
        return np.column_stack([x[:, 0] if x.shape[1] else np.zeros(n), np.zeros(n)]), "the only feature"
    z = PCA(dims, random_state=seed, svd_solver="randomized" if dims < min(x.shape) else "full").fit_transform(x)
    if n < TSNE_MIN_POINTS or dims == 2:
        return z[:, :2], f"PCA of {x.shape[1]} features ({n} images: too few for t-SNE)" if n < TSNE_MIN_POINTS \
            else f"PCA of {x.shape[1]} features"
    perplexity = min(TSNE_PERPLEXITY, (n - 1) / 3)
    # One OpenMP thread: on a busy machine scikit-learn's threaded Barnes-Hut gradient spins in
    # its barriers (measured on 2 shared cores: 300 points 4.9 s with 1 thread, 45 s with 2).
    with threadpool_limits(1, user_api="openmp"):
        coords = TSNE(2, perplexity=perplexity, max_iter=TSNE_MAX_ITER, init="pca", learning_rate="auto",
                      random_state=seed).fit_transform(z)
    return coords, (f"t-SNE (perplexity {perplexity:.3g}, {TSNE_MAX_ITER} iterations, seed {seed}) of the first "
                    f"{dims} principal components of {x.shape[1]} features")


def class_colours(k: int) -> list:
    from matplotlib import colormaps

    if k <= 10:
        return [colormaps["tab10"](i) for i in range(k)]
    if k <= 20:
        return [colormaps["tab20"](i) for i in range(k)]
    return [colormaps["turbo"](i / max(1, k - 1)) for i in range(k)]


def map_png(coords: np.ndarray, labels: np.ndarray, predicted: np.ndarray, class_names: list[str], title: str) -> bytes:
    """One dot per image in its true class's colour; mistakes drawn as a larger black-edged X."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    k = len(class_names)
    colours = class_colours(k)
    fig = Figure(figsize=(8.5, 6.5), layout="constrained")
    ax = fig.subplots()
    wrong = labels != predicted
    small = max(4.0, min(40.0, 8000.0 / max(1, len(coords))))
    for c in range(k):
        right = (labels == c) & ~wrong
        ax.scatter(coords[right, 0], coords[right, 1], s=small, color=colours[c], alpha=0.75, linewidths=0)
    for c in range(k):
        miss = (labels == c) & wrong
        ax.scatter(coords[miss, 0], coords[miss, 1], s=small * 4 + 20, color=colours[c], marker="X",
                   edgecolors="black", linewidths=0.8, zorder=3)
    handles = [Line2D([], [], marker="o", linestyle="", color=colours[c], label=_plain(name))
               for c, name in enumerate(class_names[:40])]
    handles.append(Line2D([], [], marker="X", linestyle="", markerfacecolor="white", markeredgecolor="black",
                          markersize=9, label=f"misclassified ({int(wrong.sum())}); colour: true class"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(_plain(title), fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def thumbnail_jpeg(image_root: str, relpath: str, side: int) -> tuple[bytes | None, str]:
    """(JPEG bytes, "") of the image's thumbnail, or (None, reason)."""
    from ...extract.images.decode import DecodeError, read_bytes, thumbnail_image

    try:
        img = thumbnail_image(read_bytes(os.path.join(image_root, relpath)), side)
    except DecodeError as exc:
        return None, str(exc)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=THUMB_QUALITY, optimize=True)
    return buf.getvalue(), ""
