"""PNG plots of metrics.jsonl: one panel per metric, one line per run."""

from __future__ import annotations

from pathlib import Path

from megatron_ghpo.train.metrics import read_metrics

DEFAULT_KEYS = ("train/reward", "ghpo/acc_unhinted", "ghpo/difficult_frac_stage0", "train/grad_norm")


def plot_runs(runs: dict[str, str | Path], out_png: str | Path, keys: tuple[str, ...] = DEFAULT_KEYS) -> Path:
    """``runs``: label -> metrics.jsonl path. Writes one PNG with a panel per key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for label, path in runs.items():
        rows = read_metrics(path)
        for ax, key in zip(axes[0], keys):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="." if len(pts) < 40 else None)
    for ax, key in zip(axes[0], keys):
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
