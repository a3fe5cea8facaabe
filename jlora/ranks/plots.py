"""PNG figures: eval and train loss against rank for a sweep; effective rank per layer and module."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jlora.atomic_files import write_bytes
from jlora.lora_config import ALL_LINEAR


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, out_png) -> Path:
    """The PNG written atomically (parent dirs created), the figure closed."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    out_png = Path(out_png)
    write_bytes(out_png, buf.getvalue())
    return out_png


def sweep_plot(runs: list[dict], summary: dict, out_png) -> Path:
    """Left: final train and eval loss vs r (log2 axis), the recommended r marked. Right: eval curves per r."""
    plt = _pyplot()
    ranks = [run["r"] for run in runs]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot(ranks, [run["train_loss"] for run in runs], "s--", label="train loss (last 10% of steps)")
    ax.plot(ranks, [run["eval_loss"] for run in runs], "o-", label="eval loss (last step)")
    best = summary["recommended_r"]
    ax.axvline(best, color="tab:green", alpha=0.4, lw=6, label=f"recommended r={best}")
    for r in summary.get("overfitting", {}):
        run = next(x for x in runs if x["r"] == int(r))
        ax.annotate("overfit", (run["r"], run["eval_loss"]), textcoords="offset points", xytext=(4, 6),
                    color="tab:red", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title("rank sweep: loss vs r")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for run in runs:
        if run["eval_curve"]:
            steps, evals = zip(*run["eval_curve"])
            ax2.plot(steps, evals, "o-", ms=3, label=f"r={run['r']}")
    ax2.set_xlabel("step")
    ax2.set_ylabel("eval loss")
    ax2.set_title("eval loss during training")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, out_png)


def rank_heatmap(rows: list[dict], out_png, *, title: str = "effective rank") -> Path:
    """Layers x modules heat maps of the effective rank at 90% and 99% energy, as a fraction of r;
    each cell is labelled `k/r`. Modules outside the layers (embeddings, head) are left out."""
    plt = _pyplot()
    rows = [r for r in rows if r["layer"] is not None]
    layers = sorted({r["layer"] for r in rows})
    kinds = sorted({r["kind"] for r in rows}, key=lambda k: (ALL_LINEAR.index(k) if k in ALL_LINEAR else 99, k))
    li, ki = {x: i for i, x in enumerate(layers)}, {x: i for i, x in enumerate(kinds)}
    size = (2.0 + 2.6 * len(kinds), max(3.0, 1.6 + 0.32 * len(layers)))
    fig, axes = plt.subplots(1, 2, figsize=size, squeeze=False)
    for ax, key, label in zip(axes[0], ("effective_rank_90", "effective_rank_99"), ("90%", "99%")):
        grid = np.full((len(layers), len(kinds)), np.nan)
        for r in rows:
            grid[li[r["layer"]], ki[r["kind"]]] = r[key] / r["r"]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        if len(layers) * len(kinds) <= 400:
            for r in rows:
                ax.text(ki[r["kind"]], li[r["layer"]], f"{r[key]}/{r['r']}", ha="center", va="center",
                        fontsize=7, color="white" if r[key] / r["r"] < 0.6 else "black")
        ax.set_xticks(range(len(kinds)), kinds, rotation=30)
        step = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), step), [str(x) for x in layers[::step]])
        ax.set_ylabel("layer")
        ax.set_title(f"{title} at {label} energy / r")
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return _save(plt, fig, out_png)
