"""Shared figure style, seed aggregation and saving. Plots read run folders; they never train."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Colors used for the same roles in every figure.
COLORS = {"rft": "#d62728", "sft": "#1f77b4", "bound": "#444444", "small_std": "#d62728", "rest": "#1f77b4"}


def figure(ncols: int = 1, nrows: int = 1, width: float = 4.2, height: float = 3.4, **kwargs: Any) -> Any:
    """A matplotlib figure with rftlab's style (Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
        "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25,
        "figure.dpi": 110, "savefig.dpi": 150,
    })
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                        constrained_layout=True, **kwargs)


def save(fig: Any, out_dir: Path, name: str, fmt: str = "png") -> Path:
    """Save ``fig`` as ``out_dir/name.<fmt>`` and close it."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.{fmt}"
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def mean_std(frame: Any, by: list[str], value: str) -> Any:
    """Mean and std of ``value`` over seeds (rows sharing ``by``); std is 0 for a single seed."""
    grouped = frame.groupby(by, sort=True)[value]
    out = grouped.mean().to_frame("mean")
    out["std"] = grouped.std(ddof=0).fillna(0.0)
    return out.reset_index()


def band(ax: Any, x: Any, mean: Any, std: Any, **kwargs: Any) -> None:
    """Line of the mean with a shaded ±std band."""
    (line,) = ax.plot(x, mean, **kwargs)
    if (std > 0).any():
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.18, linewidth=0)
