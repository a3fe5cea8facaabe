"""`jlora plan --max-seq-len`: the largest sequence length whose train step fits the topology's HBM.

    search = max_seq_len(planner)      # SeqLenSearch(fits=..., estimate=..., attempts=[...])

1. Estimate. The device estimate (jlora.plan.estimate) at fixed rows is a polynomial of degree <= 2 in T
   (every saved array is O(T), the reference attention's scores O(T^2), the loss chunk O(min(T, chunk)));
   it is measured at T0, 2 T0 and 4 T0 (T0 = --seq-len) and the quadratic through them is bisected for the
   largest multiple of `seq_len_multiple` under HBM. No compile.
2. Confirm (TPU). The step is compiled at the estimate's answer; then, while compiles remain
   (`max_compiles`), between the longest T that fitted and the shortest that did not (growing or
   shrinking by a quarter until both are known), by bisection to one `seq_len_multiple`.

The answer is the longest compiled T that fitted (`source` "compiled"), or the estimate's when nothing
compiled (GPUs, or no compile fitted: then `fits` is None).
"""
from __future__ import annotations

import dataclasses

from jlora.remat import AUTO_ORDER

LIMIT = 1 << 24  # tokens: no search beyond 16M


@dataclasses.dataclass
class SeqLenSearch:
    remat: str
    estimate: int            # largest multiple whose estimate fits (0: none)
    fits: int | None         # longest compiled T that fitted
    too_long: int | None     # shortest compiled T that did not
    attempts: list           # jlora.plan.planner.Attempt per compile, in order
    multiple: int

    @property
    def answer(self) -> int:
        return self.fits if self.fits is not None else self.estimate

    @property
    def source(self) -> str:
        return "compiled" if self.fits is not None else "estimate"


def _quadratic(points):
    """Coefficients (a, b, c) of a + b T + c T^2 through three (T, y) points."""
    (x0, y0), (x1, y1), (x2, y2) = points
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    c = (d12 - d01) / (x2 - x0)
    b = d01 - c * (x0 + x1)
    return y0 - b * x0 - c * x0 * x0, b, c


def estimate_max(planner, sizes: dict, remat: str) -> int:
    """The largest multiple of seq_len_multiple whose estimated device bytes per chip fit HBM (0: none)."""
    r, hbm, m = planner.request, planner.topology.chip.hbm_bytes, planner.request.seq_len_multiple
    t0 = r.seq_len
    a, b, c = _quadratic([(t, planner.estimate(sizes, r.batch_size, remat, t)) for t in (t0, 2 * t0, 4 * t0)])

    def fits(t):
        return a + b * t + c * t * t <= hbm
    if not fits(m):
        return 0
    lo, hi = m, 2 * m
    while fits(hi) and hi < LIMIT:
        lo, hi = hi, 2 * hi
    while hi - lo > m:
        mid = (lo + hi) // 2 // m * m
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_seq_len(planner) -> SeqLenSearch:
    """See the module docstring. remat "auto" searches with the policy that holds least ("offload")."""
    r = planner.request
    m = r.seq_len_multiple
    sizes = planner.mesh_sizes()
    remat = AUTO_ORDER[-1] if r.remat == "auto" else r.remat
    found = SeqLenSearch(remat=remat, estimate=estimate_max(planner, sizes, remat), fits=None, too_long=None,
                         attempts=[], multiple=m)
    if not planner.topology.is_tpu:
        return found
    t = max(found.estimate, m)
    for _ in range(max(r.max_compiles, 1)):
        planner.log(f"--max-seq-len: trying {t:,} tokens ({remat})")
        attempt = planner.attempt(sizes, r.batch_size, remat, seq_len=t)
        found.attempts.append(attempt)
        if attempt.fits:
            found.fits = max(found.fits or 0, t)
        else:
            found.too_long = t if found.too_long is None else min(found.too_long, t)
        if found.fits is not None and found.too_long is not None:
            if found.too_long - found.fits <= m:
                break
            t = (found.fits + found.too_long) // 2 // m * m
        elif found.fits is not None:
            t = (found.fits + max(m, found.fits // 4)) // m * m
        else:
            t = max(m, (t - max(m, t // 4)) // m * m)
            if found.too_long == m:
                break
    return found
