"""metrics.jsonl (one object per logged step), fanned out to the --report-to reporters (TensorBoard, W&B:
jlora.train.reporters), and the loss-curve PNG written at the end of a run."""
from __future__ import annotations

import json
from pathlib import Path

from jlora.atomic_files import write_text
from jlora.train import reporters
from jlora.train.jsonl_resume import cut_to_step


class MetricsLog:
    """Appends one JSON object per logged step to `path` and hands the same record to each reporter of
    `report_to`. `resume_from_step`: the run continues from that checkpoint, so lines after it are dropped
    (those steps run again) and the reporters are cut back to the same kept records; None: a new run.
    `run_config` (the run's settings) goes to reporters that keep one (W&B's config). `close()` flushes them."""

    def __init__(self, path: Path, *, resume_from_step: int | None = None, report_to: str | None = None,
                 run_config: dict | None = None):
        self.path = Path(path)
        if resume_from_step is not None:  # those steps run again (a torn last line goes too: jsonl_resume)
            cut_to_step(self.path, resume_from_step)
        else:
            write_text(self.path, "")
        resumed = resume_from_step is not None
        self.reporters = reporters.open_reporters(report_to, self.path.parent, resumed=resumed, config=run_config,
                                                  history=self.records() if resumed and self.path.exists() else [])

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for r in self.reporters:
            r.write(record)

    def close(self) -> None:
        """Flushes and closes the reporters (metrics.jsonl is complete after each write)."""
        opened, self.reporters = self.reporters, []
        for r in opened:
            r.close()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


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
