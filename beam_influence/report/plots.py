"""PNG images for the report (matplotlib's Agg canvas; no pyplot state, no display needed).

Every function returns PNG bytes; ``data_uri`` turns them into an ``<img src=…>`` value so the
report is one self-contained file.
"""
from __future__ import annotations

import base64
import io
import math
from typing import Sequence

import numpy as np

FLIPPED_COLOR = "#c62828"
CLEAN_COLOR = "#1565c0"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _decorate(ax, *, xlabel: str, ylabel: str, title: str, legend: dict | None = None, **grid) -> None:
    """Axis labels, a 10 pt title, a light grid (``grid``: more of its keyword arguments) and, when
    ``legend`` (its keyword arguments) is given, a legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if legend is not None:
        ax.legend(**legend)
    ax.grid(alpha=0.3, **grid)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def image_array(value) -> np.ndarray | None:
    """A record's pixel field as a 2-D array in [0, 1] (square images only), else None."""
    try:
        arr = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        return None
    if arr.ndim == 1:
        side = math.isqrt(arr.size)
        if side < 2 or side * side != arr.size:
            return None
        arr = arr.reshape(side, side)
    if arr.ndim != 2 or not np.all(np.isfinite(arr)):
        return None
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 1:  # not already in [0, 1]: rescale for display only
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return arr


def digit_png(value, *, scale: int = 6) -> bytes | None:
    """A small grey-scale image (ink dark on white), each pixel a ``scale``×``scale`` block; None if not an image."""
    from matplotlib.image import imsave

    arr = image_array(value)
    if arr is None:
        return None
    big = np.kron(arr, np.ones((scale, scale)))
    buf = io.BytesIO()
    imsave(buf, big, cmap="gray_r", vmin=0.0, vmax=1.0, format="png")
    return buf.getvalue()


def recall_curve_png(fraction_inspected: np.ndarray, fraction_found: np.ndarray, *, positive_rate: float,
                     marks: dict[float, float], auc: float | None) -> bytes:
    """Fraction of flipped labels found vs fraction of the training set inspected (by self-influence)."""
    fig = _figure(5.6, 3.8)
    ax = fig.add_subplot()
    x = 100 * fraction_inspected
    ax.plot(x, 100 * fraction_found, color=FLIPPED_COLOR, lw=2, label="by self-influence")
    ax.plot([0, 100], [0, 100], color="grey", ls="--", lw=1, label="random order")
    if positive_rate > 0:
        ax.plot([0, 100 * positive_rate, 100], [0, 100, 100], color="grey", ls=":", lw=1, label="perfect")
    for f, r in marks.items():
        ax.plot([100 * f], [100 * r], "o", color="black", ms=4)
        ax.annotate(f"{100 * r:.0f}%", (100 * f, 100 * r), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.set_xlim(0, 50)
    ax.set_ylim(0, 101)
    _decorate(ax, xlabel="training examples inspected, top % by self-influence", ylabel="flipped labels found (%)",
              title="Mislabel detection" + (f" (ROC-AUC {auc:.3f})" if auc is not None else ""),
              legend=dict(loc="lower right", fontsize=8))
    return _png(fig)


def self_influence_hist_png(self_influence: np.ndarray, flipped: np.ndarray) -> bytes:
    """Histograms of log10 self-influence for clean and flipped training examples."""
    fig = _figure(5.6, 3.8)
    ax = fig.add_subplot()
    si = np.asarray(self_influence, np.float64)
    pos = si[si > 0]
    lo = np.log10(pos.min()) if pos.size else -6
    v = np.log10(np.clip(si, 10 ** lo, None))
    bins = np.linspace(v.min(), v.max() + 1e-9, 40)
    ax.hist(v[~flipped], bins=bins, color=CLEAN_COLOR, alpha=0.6, label=f"clean ({int((~flipped).sum())})")
    ax.hist(v[flipped], bins=bins, color=FLIPPED_COLOR, alpha=0.7, label=f"flipped ({int(flipped.sum())})")
    _decorate(ax, xlabel="log10 self-influence", ylabel="training examples", title="Self-influence by label status",
              legend=dict(fontsize=8))
    return _png(fig)


def spectrum_png(ritz_values: Sequence[float], eigvals: Sequence[float], residuals: Sequence[float],
                 krylov_ritz_values: Sequence[float], cumulative: Sequence[float]) -> bytes:
    """Three panels: the Krylov Ritz values (kept ones marked), the kept λ with their residuals, and the
    cumulative share of the Krylov |λ| mass the top-i pairs hold."""
    ritz = np.asarray(ritz_values, np.float64)
    kry = np.asarray(krylov_ritz_values, np.float64)
    res = np.asarray(residuals, np.float64)
    fig = _figure(11.5, 3.6)
    a, b, c = fig.subplots(1, 3)
    kry = kry[np.isfinite(kry)]
    order = np.argsort(-np.abs(kry))
    absk = np.abs(kry[order])
    top = absk.max() if absk.size else 1.0
    absk = np.maximum(absk, top * 1e-12)  # log axis: show zeros at the floor
    neg = kry[order] < 0
    kept = np.isclose(kry[order][:, None], ritz[None, :], rtol=1e-8, atol=0).any(axis=1)
    i = np.arange(1, len(kry) + 1)
    a.semilogy(i[~neg], absk[~neg], "o", ms=3, color=CLEAN_COLOR, label="λ > 0")
    if neg.any():
        a.semilogy(i[neg], absk[neg], "v", ms=3, color=FLIPPED_COLOR, label="λ < 0 (|λ| shown)")
    a.semilogy(i[kept], absk[kept], "o", ms=7, mfc="none", color="black", label=f"kept (k={len(ritz)})")
    _decorate(a, xlabel="Ritz value, by |λ|", ylabel="|λ|", title=f"Krylov spectrum (m={len(kry)})",
              legend=dict(fontsize=7), which="both")
    j = np.arange(1, len(ritz) + 1)
    b.bar(j, np.asarray(eigvals, np.float64), color=CLEAN_COLOR, alpha=0.7, label="λ used for 1/λ")
    if np.isfinite(res).any():
        b.errorbar(j, ritz, yerr=np.nan_to_num(res), fmt="none", ecolor="black", capsize=2,
                   label="Ritz λ ± ‖Hu − λu‖")
    _decorate(b, xlabel="kept pair i", ylabel="λ", title="Kept eigenvalues and Ritz residuals",
              legend=dict(fontsize=7))
    c.plot(j, 100 * np.asarray(cumulative, np.float64), "o-", ms=3, color=CLEAN_COLOR)
    c.set_ylim(0, 100)
    _decorate(c, xlabel="top-i pairs", ylabel="% of Krylov |λ| mass", title="What the top-k capture")
    return _png(fig)


def stage_times_png(stages: Sequence[dict]) -> bytes:
    """Horizontal bars: seconds per stage."""
    names = [s["name"] for s in stages]
    secs = [float(s.get("seconds", 0.0)) for s in stages]
    fig = _figure(5.6, 0.35 * len(names) + 1.0)
    ax = fig.add_subplot()
    y = np.arange(len(names))[::-1]
    ax.barh(y, secs, color=CLEAN_COLOR, alpha=0.8)
    ax.set_yticks(y, names, fontsize=8)
    for yi, s in zip(y, secs):
        ax.annotate(f"{s:.1f}s", (s, yi), textcoords="offset points", xytext=(3, -3), fontsize=7)
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(secs + [1.0]) * 1.15)
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)
