"""metrics.jsonl (one object per logged step) and the loss-curve PNG written at the end of a run."""
from __future__ import annotations

import json
from pathlib import Path

from jlora.atomic_files import write_text


class MetricsLog:
    def __init__(self, path: Path, *, resume_from_step: int | None = None):
        self.path = Path(path)
        if resume_from_step is not None and self.path.exists():
            # Drop what was logged after the checkpoint we resume from: those steps run again.
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            keep = [line for i, line in enumerate(lines) if _step(line, last=i == len(lines) - 1) <= resume_from_step]
            write_text(self.path, "".join(line + "\n" for line in keep))
        elif resume_from_step is None:
            write_text(self.path, "")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _step(line: str, *, last: bool) -> float:
    """The step of a metrics line; a last line cut short by a killed run counts as not yet written."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        if last:
            return float("inf")
        raise


def plot_losses(records: list[dict], out_png: Path, title: str = "jlora training") -> Path:
    """Train loss per step and eval loss where measured, to `out_png`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
