"""Run as a script: `jlora plan` of a small Llama config dir on v5e:2x2 in several settings, as JSON lines.

    python tiny_plans.py MODEL_DIR
prints one {"case": ..., **to_json(plan)} per line (no suggestion search).
"""
import json
import sys

from jlora.plan.planner import PlanRequest, plan
from jlora.plan.report import to_json

# Mesh cases use remat: without it XLA keeps every layer's all-gathered weights from the forward to
# the backward pass (one gather, reused), so fsdp shrinks the arguments but not the temporaries. They also
# use blockwise attention: at this size the temporaries are as large as the sharded savings, and with splash
# (auto on TPU) libtpu scheduled ~18 MB more temporaries for fsdp=4 than for data=2,fsdp=2 (57.7 vs 39.9 MB;
# blockwise 61.1 vs 54.1), which hid the frozen bytes' 4-way split that these cases check.
MESH = dict(batch_size=8, remat="full", attention="blockwise")
CASES = {
    "batch4": dict(batch_size=4, mesh="fsdp=4", remat="none"),
    "batch8": dict(batch_size=8, mesh="fsdp=4", remat="none"),
    "accum2": dict(batch_size=4, mesh="fsdp=4", remat="none", grad_accum=2),
    "data4": dict(mesh="data=4", **MESH),
    "data2_fsdp2": dict(mesh="data=2,fsdp=2", **MESH),
    "fsdp4": dict(mesh="fsdp=4", **MESH),
}

if __name__ == "__main__":
    for case, kw in CASES.items():
        request = PlanRequest(model=sys.argv[1], topology="v5e:2x2", seq_len=128, suggest=False, **kw)
        print(json.dumps({"case": case, **to_json(plan(request))}), flush=True)
