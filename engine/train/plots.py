"""Plots saved as PNG: training curves and a confusion matrix. Needs matplotlib (the `plot` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        from engine.errors import install_hint

        raise ImportError(f"plots need matplotlib: {install_hint('plot', 'matplotlib')}") from e
    return plt


def plot_history(history, path: str | Path, keys: list[str] | None = None) -> Path:
    """One panel per figure (loss, accuracy ...), train and validation curves together."""
    plt = _pyplot()
    data = history.history if hasattr(history, "history") else dict(history)
    keys = keys or [k for k in data if not k.startswith("val_") and k not in ("epoch_time", "samples_per_s", "lr")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        epochs = np.arange(1, len(data[key]) + 1)
        ax.plot(epochs, data[key], label=f"train {key}")
        if f"val_{key}" in data:
            ax.plot(epochs, data[f"val_{key}"], label=f"validation {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_confusion_matrix(matrix, path: str | Path, class_names=None, normalize: bool = False) -> Path:
    """A heat map of ``matrix`` (rows: true class, columns: predicted), with the counts written in."""
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=np.float64)
    if normalize:
        matrix = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    names = class_names or [str(i) for i in range(len(matrix))]
    fig, ax = plt.subplots(figsize=(0.6 * len(names) + 2, 0.6 * len(names) + 1.5))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.2f}" if normalize else f"{int(value)}", ha="center", va="center",
                color="white" if value > threshold else "black", fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
