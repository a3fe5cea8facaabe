"""How much of its rank each adapted module uses: norms, spectra and effective ranks, and a summary.

For every module, delta W = scale * B @ A: its Frobenius norm, singular values (spectrum.factored_svd)
and the effective rank at 90% and 99% of the energy. A module whose 99% effective rank is far below r
carries rank it does not use; one whose 99% effective rank equals r may be limited by r.
"""
from __future__ import annotations

import statistics

import numpy as np

from jlora.ranks.adapter import Adapter
from jlora.ranks.spectrum import effective_rank, energy_kept, factored_svd
from jlora.vllm_rules import MAX_LORA_RANKS

KEEP = 0.99  # energy a truncation may keep and still count as "the rank was unused"


def rank_usage(adapter: Adapter) -> list[dict]:
    """One dict per adapted module: module, layer, kind, r, scale, norm, singular_values,
    effective_rank_90, effective_rank_99."""
    rows = []
    for m in adapter.modules:
        s = factored_svd(m.a, m.b, m.scale).s
        rows.append({
            "module": m.name, "layer": m.layer, "kind": m.kind, "r": m.r, "scale": m.scale,
            "norm": float(np.sqrt(np.square(s).sum())),
            "singular_values": [float(x) for x in s],
            "effective_rank_90": effective_rank(s, 0.90),
            "effective_rank_99": effective_rank(s, 0.99),
        })
    return rows


def smallest_lossless_max_rank(rows: list[dict], keep: float = KEEP) -> int | None:
    """The smallest vLLM --max-lora-rank at which every module keeps `keep` of its energy."""
    top = max(r["r"] for r in rows)
    for k in MAX_LORA_RANKS:
        if k >= top or all(energy_kept(np.asarray(r["singular_values"]), k) >= keep for r in rows):
            return k
    return None


def _median_use(rows):
    return statistics.median(r["effective_rank_99"] / r["r"] for r in rows)


def usage_summary(rows: list[dict]) -> list[str]:
    """Plain sentences: where rank goes unused, where it may be the limit, and which export fits."""
    lines = []
    live = [r for r in rows if r["norm"] > 0]
    dead = len(rows) - len(live)
    ranks = sorted({r["r"] for r in rows})
    r_text = f"r={ranks[0]}" if len(ranks) == 1 else f"r={ranks[0]}..{ranks[-1]}"
    if dead:
        lines.append(f"{dead} of {len(rows)} modules have a zero update (lora_B never moved from its zero init).")
    if not live:
        return lines + ["Nothing was learned: every delta W is zero."]
    e90 = statistics.median(r["effective_rank_90"] for r in live)
    e99 = statistics.median(r["effective_rank_99"] for r in live)
    lines.append(f"{len(live)} modules ({r_text}): median effective rank {e90:g} at 90% energy, {e99:g} at 99%; "
                 f"they use {100 * _median_use(live):.0f}% of their rank (median 99%-rank / r).")
    kinds = sorted({r["kind"] for r in live}, key=lambda k: _median_use([r for r in live if r["kind"] == k]))
    per_kind = [(k, [r for r in live if r["kind"] == k]) for k in kinds]
    if len(per_kind) > 1:
        lines.append("By module, least used first (median 99%-rank / r): " + ", ".join(
            f"{k} {statistics.median(r['effective_rank_99'] for r in g):g}/{g[0]['r']}" for k, g in per_kind) + ".")
    unused = [k for k, g in per_kind if _median_use(g) <= 0.5]
    if unused:
        lines.append(f"Rank goes unused in {', '.join(unused)}: half or more of their rank holds under 1% of "
                     f"the update's energy; a smaller r (rank_pattern) would do for them.")
    layers = sorted({r["layer"] for r in live if r["layer"] is not None})
    if len(layers) > 1:
        use = {lyr: _median_use([r for r in live if r["layer"] == lyr]) for lyr in layers}
        low = [lyr for lyr in layers if use[lyr] <= 0.5]
        if low:
            lines.append(f"Layers using at most half their rank: {_ranges(low)}.")
    full = [r for r in live if r["effective_rank_99"] >= r["r"] and r["r"] > 1]
    if full:
        lines.append(f"{len(full)} modules use all of their rank at 99% energy (e.g. {full[0]['module']}): "
                     f"r may be limiting them; a sweep over larger r tells whether that costs eval loss.")
    k = smallest_lossless_max_rank(rows)
    top = max(ranks)
    if k is not None and k < top:
        lines.append(f"Every module keeps >= {100 * KEEP:.0f}% of its energy at rank {k}: "
                     f"`jlora export --max-lora-rank {k}` serves it with {k}/{top} of the rank.")
    return lines


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    groups = []
    for x in xs:
        if groups and x == groups[-1][1] + 1:
            groups[-1][1] = x
        else:
            groups.append([x, x])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in groups)
