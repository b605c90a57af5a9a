"""PNG plots with the algorithms side by side (matplotlib Agg, no display needed)."""

import math
from pathlib import Path

# (metric key, axis title) of the line plots in training_curves.png
CURVES = (
    ("entropy", "token entropy (nats)"),
    ("kl_ref", "KL to start model (k3)"),
    ("grad_norm", "grad norm (before clipping)"),
    ("val_accuracy", "validation accuracy (greedy)"),
    ("train_reward", "train mean reward"),
    ("expert_max_share", "max expert share (router)"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ratio_range(records_by_algo: dict[str, list[dict]], max_token_ratio: float, path: Path) -> None:
    """Min-max band of token ratios per step, one panel per algorithm (the paper's Figures 1 and 3), log scale."""
    plt = _pyplot()
    algos = list(records_by_algo)
    fig, axes = plt.subplots(1, len(algos), figsize=(5 * len(algos), 3.6), sharey=True, squeeze=False)
    for ax, algo in zip(axes[0], algos, strict=True):
        records = records_by_algo[algo]
        steps = [r["step"] for r in records]
        ax.fill_between(
            steps,
            [r["token_ratio_min"] for r in records],
            [r["token_ratio_max"] for r in records],
            alpha=0.35,
            label="token ratio min-max",
        )
        ax.plot(steps, [r.get("token_ratio_mean", math.nan) for r in records], lw=1, label="token ratio mean")
        for bound in (max_token_ratio, 1 / max_token_ratio):
            ax.axhline(bound, color="red", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(algo)
        ax.set_xlabel("RL step")
    axes[0][0].set_ylabel("importance ratio (verdict bounds dashed)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(records_by_algo: dict[str, list[dict]], start_val_accuracy: float, path: Path) -> None:
    """One panel per metric in CURVES, one line per algorithm; validation accuracy starts at the warm start (step 0)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    for ax, (key, title) in zip(axes.flat, CURVES, strict=True):
        for algo, records in records_by_algo.items():
            points = [(r["step"], r[key]) for r in records if key in r]
            if key == "val_accuracy":
                points.insert(0, (0, start_val_accuracy))
            if points:
                ax.plot(*zip(*points, strict=True), marker="o" if key == "val_accuracy" else None, ms=3, label=algo)
        ax.set_title(title)
        ax.set_xlabel("RL step")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
