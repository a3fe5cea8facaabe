"""`jlora plan --max-seq-len` (jlora.plan.seq_len): the estimate's quadratic in T is bisected for the largest
multiple that fits, then compiles bisect between what fitted and what did not. Checked with stand-ins for
the planner whose memory is a known function of T (the real estimate and compiles: tests/plan/test_estimate.py,
test_plan_tpu.py)."""
import dataclasses
import types

from jlora.plan.seq_len import estimate_max, max_seq_len

GiB = 1 << 30


@dataclasses.dataclass
class _Attempt:
    fits: bool
    seq_len: int


def _planner(estimate, compiled=None, *, tpu=True, hbm=16 * GiB, seq_len=2048, multiple=1024, max_compiles=6,
             remat="auto"):
    calls = []

    def attempt(sizes, batch, remat, seq_len):
        calls.append(seq_len)
        return _Attempt(fits=compiled(seq_len) <= hbm, seq_len=seq_len)

    request = types.SimpleNamespace(seq_len=seq_len, seq_len_multiple=multiple, max_compiles=max_compiles,
                                    batch_size=4, remat=remat)
    return types.SimpleNamespace(
        request=request, topology=types.SimpleNamespace(is_tpu=tpu, chip=types.SimpleNamespace(hbm_bytes=hbm)),
        estimate=lambda sizes, b, remat, t: estimate(t), attempt=attempt, mesh_sizes=lambda: {}, log=lambda *a: None,
        calls=calls)


def test_estimate_bisection_finds_the_largest_fitting_multiple():
    linear = _planner(lambda t: 2 * GiB + 100_000 * t)   # fits up to 150,323 tokens
    assert estimate_max(linear, {}, "full") == 149_504   # 146 x 1024
    quadratic = _planner(lambda t: 1 * GiB + 4 * t * t)  # fits up to 63,456 tokens (reference attention)
    assert estimate_max(quadratic, {}, "none") == 62_464
    assert estimate_max(_planner(lambda t: 17 * GiB + t), {}, "full") == 0


def test_compiles_bisect_from_the_estimate():
    """The estimate says 149,504; the compiler needs 10% more: compiles walk down, then bisect to 1024."""
    planner = _planner(lambda t: 2 * GiB + 100_000 * t, lambda t: 2 * GiB + 110_000 * t, max_compiles=8)
    found = max_seq_len(planner)
    truth = (16 * GiB - 2 * GiB) // 110_000 // 1024 * 1024  # 136,192
    assert found.estimate == 149_504 and found.remat == "offload"  # auto searches with the lightest-memory policy
    assert found.fits == truth and found.too_long == truth + 1024 and found.source == "compiled"
    assert planner.calls[0] == 149_504 and len(planner.calls) <= 8


def test_compiles_grow_when_the_estimate_is_pessimistic_and_stop_at_the_budget():
    planner = _planner(lambda t: 2 * GiB + 100_000 * t, lambda t: 2 * GiB + 50_000 * t, max_compiles=2,
                       remat="full")
    found = max_seq_len(planner)
    assert found.remat == "full" and planner.calls == [149_504, 186_368] and found.fits == 186_368
    assert found.too_long is None and found.answer == 186_368


def test_gpu_answers_from_the_estimate():
    found = max_seq_len(_planner(lambda t: 2 * GiB + 100_000 * t, tpu=False))
    assert found.fits is None and found.answer == found.estimate == 149_504 and found.source == "estimate"
