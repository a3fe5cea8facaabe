"""The whole LoRA and QLoRA train step with splash attention compiles for TPU v5e and v5p under every remat
policy (libtpu, no TPU needed), through `jlora plan`'s planner (jlora.plan.planner: the trainer's shardings,
optimizer and step, traced under jax.set_mesh so splash runs per device).

What the compiler reports also checks the policies: "full" holds fewer temporaries than "dots", "dots" fewer
than "none", only
"offload" puts bytes in host memory (the layer inputs: layers x rows x T x hidden x 2 bytes per chip, bf16),
and every policy's step carries splash's Mosaic kernels (tpu_custom_call in the lowered program).

A 2-layer model (hidden 256, 2 heads of 128: splash's lane width) at 4 x 1024 tokens over 4 chips, so each of
the 16 compiles takes seconds; they run in one subprocess with JAX_PLATFORMS=cpu (tests/plan/test_plan_tpu.py).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

POLICY_ORDER = ("none", "dots", "full", "offload")
SCRIPT = r'''
import json, sys
from pathlib import Path
from jlora.plan.planner import Planner, PlanRequest
from jlora.remat import POLICIES

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
(out / "config.json").write_text(json.dumps({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128,
    "vocab_size": 1024, "max_position_embeddings": 4096}))
for topology in ("v5e:2x2", "v5p:2x2x1"):
    for quantize in (None, "nf4"):
        planner = Planner(PlanRequest(model=str(out), topology=topology, quantize=quantize, batch_size=4,
                                      seq_len=1024, attention="splash", suggest=False))
        for remat in POLICIES:
            a = planner.attempt(planner.mesh_sizes(), 4, remat)
            print(json.dumps(dict(topology=topology, quantize=quantize, remat=remat, source=a.source, fits=a.fits,
                                  device=a.bytes_per_chip, host=a.host_bytes_per_chip,
                                  temporaries=a.memory.get("temporaries"), seconds=a.compile_seconds,
                                  mosaic=a.kernel_calls)), flush=True)
'''


@pytest.mark.slow
def test_lora_and_qlora_steps_compile_with_splash_under_every_remat_policy(tmp_path):
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip('libtpu is not installed (pip install "jax[tpu]" at the installed jax version)')
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_WORKER_HOSTNAMES="localhost")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "model")], env=env, capture_output=True,
                          text=True, timeout=1800, check=False, cwd="/")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 16, f"rc={proc.returncode}:\n{proc.stderr[-3000:]}"
    by = {(r["topology"], r["quantize"], r["remat"]): r for r in rows}
    for r in rows:
        assert r["source"] == "compiled" and r["fits"], r
        assert r["mosaic"] and r["mosaic"] >= 2, r  # splash's kernels are in the step (Mosaic custom calls)
    for topology in ("v5e:2x2", "v5p:2x2x1"):
        for quantize in (None, "nf4"):
            none, dots, full, offload = (by[topology, quantize, p] for p in POLICY_ORDER)
            # dots saves the projections' outputs in bf16 (jlora.remat.PROJECTION): between none and full
            assert full["temporaries"] < dots["temporaries"] < none["temporaries"], (none, dots, full)
            assert by[topology, quantize, "dots"]["host"] == none["host"] == full["host"] == 0
            # 2 layers x 1 row per chip x 1024 tokens x 256 hidden x bf16, at most (XLA may keep one on device)
            assert 0 < offload["host"] <= 2 * 1024 * 256 * 2, offload
