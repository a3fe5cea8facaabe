"""The verdict on an export: is its logit drift acceptable, what did the cut lose, which --max-lora-rank fits.

Acceptable means   relative drift = max |delta logits| / max |logits(base + original)| <= threshold,
measured by jlora.ranks.drift on random token sequences; the default threshold is DRIFT_THRESHOLD = 1%.
Why 1%: serving in bfloat16 rounds every logit by up to 2^-8 = 0.39% of its magnitude, so a drift below
1% of the largest logit is of the order of what the server's own rounding adds; the 34.8% of a rank-1 cut
of a rank-4 adapter is not. Pass another value with `jlora export --max-drift PCT`.

Energy lost by a module cut from rank r to k:   1 - ||delta W_k||_F^2 / ||delta W||_F^2
(= the sum of the cut squared singular values over the sum of all), listed largest first.

The recommended `--max-lora-rank` is the smallest value vLLM accepts (vllm_rules.MAX_LORA_RANKS) whose
export's drift is within the threshold. Candidates below the source's largest rank are measured in
increasing order until one passes; the smallest accepted value at or above the largest rank cuts nothing
and changes no delta W (drift zero up to float32 rounding of the folded scales), so it always qualifies.
"""
from __future__ import annotations

import tempfile

from jlora.vllm_rules import MAX_LORA_RANKS, smallest_max_lora_rank

DRIFT_THRESHOLD = 0.01
TOP_MODULES = 5


def energy_lost(modules, top: int = TOP_MODULES) -> tuple[list[dict], int]:
    """(the `top` cut modules that lost the largest share of their energy, how many other modules were cut)."""
    cut = sorted((m for m in modules if m.truncated), key=lambda m: m.energy_kept)
    rows = [{"module": m.module, "r": m.r, "rank": m.rank, "energy_lost": 1.0 - m.energy_kept} for m in cut[:top]]
    return rows, max(0, len(cut) - top)


def recommend_max_lora_rank(adapter, probe, threshold: float, measured: dict[int, float] | None = None
                            ) -> tuple[int | None, float | None]:
    """(smallest vLLM --max-lora-rank whose export drifts <= threshold, its relative drift); (None, None) if
    none does (an adapter rank above 512). `measured` maps ranks already measured to their relative drift."""
    from jlora.ranks.export import build_export, write_export
    measured = dict(measured or {})
    top = max(m.r for m in adapter.modules)
    for n in (n for n in MAX_LORA_RANKS if n < top):
        if n not in measured:
            with tempfile.TemporaryDirectory(prefix="jlora-drift-") as d:
                write_export(build_export(adapter, n), d)
                measured[n] = probe.measure(d)["relative"]
        if measured[n] <= threshold:
            return n, measured[n]
    ceiling = smallest_max_lora_rank(top)
    return (ceiling, 0.0) if ceiling is not None else (None, None)


def verdict(export, drift: dict | None, threshold: float, recommended: tuple[int | None, float | None] | None,
            base_note: str | None = None, base_checked: bool = True) -> dict:
    """The verdict dict export_report.json records (and `jlora export` prints).

    `base_note` ("base not verified: ...", jlora.ranks.drift.check_base) is recorded as base_verified =
    False and appended to the reason: a drift measured on a base nobody checked is never plainly acceptable.
    base_verified is None when no base was looked at (`base_checked` False: --no-drift without --merge).
    """
    top, rest = energy_lost(export.modules)
    if not export.truncated:
        acceptable, why = True, "no module was cut: every delta W is the source's (folded scales are exact)"
    elif drift is None:
        acceptable, why = None, "drift not measured (--no-drift, no local base, or an embedding adapter)"
    else:
        acceptable = drift["relative"] <= threshold
        why = (f"relative drift {drift['relative']:.3%} {'<=' if acceptable else '>'} threshold {threshold:.3%}")
    if base_note:
        why = f"{why} ({base_note})"
    out = {"threshold": threshold, "measure": "max|delta logits| / max|logits(base + original)|",
           "acceptable": acceptable, "reason": why,
           "base_verified": (base_note is None) if base_checked else None,
           "most_energy_lost": top, "other_cut_modules": rest}
    if recommended is not None:
        out["recommended_max_lora_rank"], out["recommended_relative_drift"] = recommended
    return out


def verdict_lines(v: dict) -> list[str]:
    """Human-readable lines for `verdict(...)`."""
    state = {True: "acceptable", False: "NOT acceptable", None: "unknown"}[v["acceptable"]]
    lines = [f"verdict: {state}: {v['reason']}"]
    if v["most_energy_lost"]:
        lines.append("most energy lost (1 - ||delta W_k||^2 / ||delta W||^2):")
        lines += [f"  {m['module']}: rank {m['r']} -> {m['rank']}, lost {m['energy_lost']:.2%}"
                  for m in v["most_energy_lost"]]
        if v["other_cut_modules"]:
            lines.append(f"  the other {v['other_cut_modules']} cut modules lost less")
    if "recommended_max_lora_rank" in v:
        n, rel = v["recommended_max_lora_rank"], v["recommended_relative_drift"]
        how = "cuts nothing" if rel == 0.0 else f"drift {rel:.3%}"
        lines.append(f"smallest --max-lora-rank within the {v['threshold']:.3%} threshold: {n} ({how})"
                     if n is not None else f"no --max-lora-rank vLLM accepts keeps the drift within "
                                           f"{v['threshold']:.3%}")
    return lines
