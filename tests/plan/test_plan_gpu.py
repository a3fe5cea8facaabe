"""`jlora plan` for GPUs: no compiler here, so memory comes from abstract evaluation and the plan says so."""
import pytest

from jlora.plan.planner import PlanRequest, plan
from jlora.plan.report import format_text, to_json

GB = 1e9


def test_8b_qlora_on_eight_h100s_is_an_estimate_that_fits():
    p = plan(PlanRequest(model="llama-3.1-8b", topology="h100:8", quantize="nf4", batch_size=8, seq_len=2048))
    r = to_json(p)
    assert r["estimate"] is True and r["fits"] is True and r["attempts"][-1]["source"] == "estimate"
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # Frozen bytes per GPU from the architecture: NF4 projections at 4.127 bits, the other 1.05B in bf16, / 8.
    projections = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    want = (projections * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + 2 * (8_030_261_248 - projections)) / 8
    assert abs(r["memory"]["frozen"] - want) <= 0.005 * want
    assert r["memory"]["frozen"] < r["bytes_per_chip"] <= 80 * 2**30
    assert "ESTIMATE" in format_text(p)


@pytest.mark.slow  # abstract evaluation of 80 layers (~16 s on 2 cores); the 8B case above runs by default
def test_70b_in_bf16_on_one_h100_does_not_fit():
    r = to_json(plan(PlanRequest(model="llama-3.1-70b", topology="h100", batch_size=1, seq_len=1024,
                                 suggest=False)))
    assert r["fits"] is False and r["bytes_per_chip"] > 140 * GB  # 141 GB of bf16 weights alone
