"""Run as a script: the full LoRA and QLoRA train step with the Pallas kernels, compiled for each TPU generation.

    python kernel_plans.py MODEL_DIR
prints one {"case": ..., **to_json(plan)} per line: v4, v5e, v5p and v6e (2x2 slices, fsdp=4), each in
bfloat16 and NF4, v5e on fsdp=2,tensor=2 (the kernels under shard_map with a tensor split), and
v5e NF4 with impl="xla" (no Mosaic kernel: the count is the Pallas kernels' own).
"""
import json
import time
import sys

from jlora.plan.planner import PlanRequest, plan
from jlora.plan.report import to_json

TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}

if __name__ == "__main__":
    cases = [(f"{g} {q or 'bf16'}", topo, "fsdp=4", q, "pallas")
             for g, topo in TOPOLOGIES.items() for q in (None, "nf4")]
    cases += [(f"v5e {q or 'bf16'} tensor", "v5e:2x2", "fsdp=2,tensor=2", q, "pallas") for q in (None, "nf4")]
    cases += [("v5e nf4 xla", "v5e:2x2", "fsdp=4", "nf4", "xla")]  # the same step on XLA's path: no Mosaic call
    for case, topology, mesh, quantize, kernels in cases:
        request = PlanRequest(model=sys.argv[1], topology=topology, mesh=mesh, quantize=quantize, batch_size=8,
                              seq_len=128, remat="full", kernels=kernels, suggest=False,
                              attention="blockwise")  # no splash: the Mosaic count is the LoRA kernels' own
        t0 = time.perf_counter()
        result = to_json(plan(request))
        print(json.dumps({"case": case, "seconds": round(time.perf_counter() - t0, 1), **result}), flush=True)
