"""A rank sweep (seed 002's systematic search): train each r on the same data, seed and budget, compare
eval loss, recommend the lowest and flag overfitting.

Each rank is a normal `jlora train` run (jlora.train.Trainer) in `<out>/r<k>`; lora_alpha follows r as
`alpha_ratio * r` (so scaling, hence the effective step size, is the same for every r) unless a fixed
lora_alpha is given. Overfitting is flagged two ways:

- within a run: its last eval loss is above the lowest it reached while the train loss kept falling;
- across ranks: a larger r reaches a lower train loss than the recommended r but a higher eval loss.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from jlora.atomic_files import write_json
from jlora.train.config import TrainConfig, with_demo_settings

RISE = 1e-3   # relative change that counts as "rising" / "falling"


def parse_ranks(text: str) -> list[int]:
    try:
        ranks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--ranks {text!r}: expected comma-separated positive integers, e.g. 4,8,16,32") from None
    if not ranks or any(r < 1 for r in ranks):
        raise ValueError(f"--ranks {text!r}: expected comma-separated positive integers, e.g. 4,8,16,32")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"--ranks {text!r} repeats a rank")
    return sorted(ranks)


def window(losses: list[float], end: int, width: int) -> float:
    """Mean of the `width` train losses ending at step `end` (1-based): a less noisy train loss."""
    part = losses[max(0, end - width):end]
    return sum(part) / len(part)


def summarise_run(r: int, lora_alpha: float, out: Path, records: list[dict], trainable: int | None) -> dict:
    """What sweep.json keeps of one run."""
    losses = [rec["loss"] for rec in records if "loss" in rec]
    steps = [rec["step"] for rec in records if "loss" in rec]
    width = max(1, len(losses) // 10)
    evals = [(rec["step"], rec["eval_loss"]) for rec in records if "eval_loss" in rec]
    at = {s: i + 1 for i, s in enumerate(steps)}
    return {
        "r": r, "lora_alpha": lora_alpha, "out": str(out), "adapter": str(out / "adapter"),
        "trainable_params": trainable, "steps": steps[-1] if steps else 0,
        "train_loss": window(losses, len(losses), width) if losses else None,
        "eval_loss": evals[-1][1] if evals else None,
        "eval_curve": [[s, e] for s, e in evals],
        "train_loss_at_evals": [window(losses, at.get(s, len(losses)), width) for s, _ in evals],
    }


def analyse(runs: list[dict]) -> dict:
    """{"recommended_r", "best_eval_loss", "flags": [...], "overfitting": {r: [reasons]}} for summarised runs."""
    scored = [run for run in runs if run.get("eval_loss") is not None and math.isfinite(run["eval_loss"])]
    if not scored:
        raise ValueError("no run has an eval loss: give --eval, or keep --eval-fraction > 0 with >= 20 examples")
    best = min(scored, key=lambda run: (run["eval_loss"], run["r"]))
    over: dict[int, list[str]] = {}
    for run in scored:
        curve, train = run["eval_curve"], run["train_loss_at_evals"]
        if len(curve) >= 2:
            i = min(range(len(curve)), key=lambda j: curve[j][1])
            (s_min, e_min), (s_end, e_end) = curve[i], curve[-1]
            if i < len(curve) - 1 and e_end > e_min * (1 + RISE) and train[-1] < train[i] * (1 - RISE):
                over.setdefault(run["r"], []).append(
                    f"eval loss rose from {e_min:.4f} (step {s_min}) to {e_end:.4f} (step {s_end}) while the "
                    f"train loss fell from {train[i]:.4f} to {train[-1]:.4f}")
        if (run["r"] > best["r"] and run["eval_loss"] > best["eval_loss"] * (1 + RISE)
                and run["train_loss"] < best["train_loss"] * (1 - RISE)):
            over.setdefault(run["r"], []).append(
                f"train loss {run['train_loss']:.4f} is below r={best['r']}'s {best['train_loss']:.4f} but eval "
                f"loss {run['eval_loss']:.4f} is above its {best['eval_loss']:.4f}")
    flags = [f"r={r}: overfitting: {'; '.join(reasons)}" for r, reasons in sorted(over.items())]
    return {"recommended_r": best["r"], "best_eval_loss": best["eval_loss"], "flags": flags,
            "overfitting": {str(r): reasons for r, reasons in sorted(over.items())}}


def rank_configs(base: TrainConfig, ranks: list[int], out: Path, *, alpha_ratio: float | None,
                 lora_alpha: float | None) -> list[TrainConfig]:
    """One TrainConfig per rank: same everything, out = <out>/r<k>, alpha = alpha_ratio * r or fixed."""
    if lora_alpha is None and alpha_ratio is None:
        alpha_ratio = base.lora_alpha / base.r
    return [dataclasses.replace(base, r=r, out=str(out / f"r{r}"),
                                lora_alpha=lora_alpha if lora_alpha is not None else alpha_ratio * r)
            for r in ranks]


def check_run_dirs(configs: list[TrainConfig]) -> None:
    """Refuses up front (before any training) when a rank's dir holds a run and neither resume nor overwrite,
    or when --resume would continue a rank with settings that differ from its run_config.json."""
    from jlora.train import run_dir
    taken = [c.out for c in configs if not (c.resume or c.overwrite)
             and any((Path(c.out) / f).exists() for f in run_dir.MARKERS)]
    if taken:
        raise run_dir.RunDirError(f"{', '.join(taken)} hold earlier runs; pass --resume to continue the sweep or "
                                  f"--overwrite to replace it")
    for c in configs:
        run_dir.check(c, log=lambda *a, **k: None)


def embedded_default(base: TrainConfig, out: Path, chosen: set[str]) -> TrainConfig:
    """The embedded default (tiny Llama + bundled data) with `jlora train`'s demo settings except those in
    `chosen`, its base built once in <out>/base and shared by every rank."""
    from jlora.default import build_default_base, dataset_paths
    base = with_demo_settings(base, chosen)
    train_path, eval_path = dataset_paths()
    return dataclasses.replace(base, model=str(build_default_base(out / "base")), data=str(train_path),
                               eval=str(eval_path))


def run_sweep(base: TrainConfig, ranks: list[int], out, *, alpha_ratio: float | None = None,
              lora_alpha: float | None = None, log=print) -> dict:
    """Trains every rank, writes <out>/sweep.json and <out>/sweep.png, and returns the sweep.json dict."""
    from jlora.ranks.params import lora_parameter_count, resolve_model
    from jlora.ranks.plots import sweep_plot
    from jlora.train.trainer import Trainer

    out = Path(out)
    if not base.eval_every:
        base = dataclasses.replace(base, eval_every=10 ** 9)  # evaluate at the last step only
    if lora_alpha is None and alpha_ratio is None:
        alpha_ratio = base.lora_alpha / base.r
    configs = rank_configs(base, ranks, out, alpha_ratio=alpha_ratio, lora_alpha=lora_alpha)
    check_run_dirs(configs)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for c in configs:
        log(f"== r={c.r} lora_alpha={c.lora_alpha:g} -> {c.out}")
        result = Trainer(c, log=_quiet(log)).run()
        try:
            trainable = lora_parameter_count(resolve_model(result["model_dir"])[0], c.r, c.targets)
        except ValueError:
            trainable = None
        run = summarise_run(c.r, c.lora_alpha, Path(c.out), result["records"], trainable)
        if run["eval_loss"] is None:
            raise ValueError(f"{c.out}: the run has no eval loss to compare ranks by: give --eval, or keep "
                             f"--eval-fraction > 0 with >= 20 training examples")
        runs.append(run)
    summary = analyse(runs)
    report = {"ranks": ranks, "runs": runs, **summary,
              "settings": {**dataclasses.asdict(base), "r": None, "out": str(out),
                           "alpha_ratio": alpha_ratio if lora_alpha is None else None,
                           "lora_alpha": lora_alpha}}
    report["plot"] = str(sweep_plot(runs, summary, out / "sweep.png"))
    write_json(out / "sweep.json", report)
    return report


def _quiet(log):
    """Passes on a run's data / model / final-loss lines, not its load-in-PEFT and vLLM instructions."""
    def f(msg="", *a, **k):
        text = str(msg).strip()
        if text.startswith(("settings:", "data:", "model:", "loss ", "resumed", "--resume", "--overwrite")):
            log("   " + text.splitlines()[0])
    return f
