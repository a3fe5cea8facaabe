"""`jlora plan` compiles the real sharded train step with libtpu for TPU slices (no TPU needed).

run_plans.py runs the jobs one after another in the background (JAX_PLATFORMS=cpu,
ALLOW_MULTIPLE_LIBTPU_LOAD=1), started by conftest.py when collection ends: the 8B preset in
bfloat16 and in NF4 at batch 8 x 2048 (remat auto: each compiles the remat step, ~25 CPU seconds with
the decoder layers scanned, jlora plan's default; the loop took 2-3 min of one core), the 70B preset in bf16 (refused without
compiling: its weights alone exceed 4 x 16 GiB), a small config in six settings (tiny_plans.py), and
its train step on the Pallas kernels for v4, v5e, v5p and v6e (kernel_plans.py). Skipped when libtpu
is absent.

The NF4 case guards the row-wise dequantize (jlora.nf4.dequantize): with the flat bitsandbytes
layout sharded over fsdp and dequantized through pad / reshape / slice, libtpu's SPMD partitioner
took ~60 s and ~1.6 GB of host memory per layer (the 32-layer compile ran out of 23 GB after 16 min).
"""
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jlora.remat import AUTO_ORDER

# ~6 min of one core: the README's test command leaves these out (`-m "not slow"` in pyproject's addopts);
# `python -m pytest -m slow` runs them, and .ci/run does both.
pytestmark = pytest.mark.slow

GiB = 1 << 30
HERE = Path(__file__).parent
JOBS = ("70b", "small", "kernels", "8b", "8b-nf4")
_RUN = {}


def start_plans():
    """Starts run_plans.py in the background (called by conftest.py after collection)."""
    if not _RUN and importlib.util.find_spec("libtpu") is not None:
        out = Path(tempfile.mkdtemp(prefix="jlora-plans-"))
        _RUN.update(out=out, proc=subprocess.Popen([sys.executable, str(HERE / "run_plans.py"), str(out)],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return _RUN


@pytest.fixture(scope="module")
def runs():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip('libtpu is not installed (pip install "jax[tpu]" at the installed jax version)')
    run = start_plans()
    try:
        _, stderr = run["proc"].communicate(timeout=2400)
    finally:
        if run["proc"].poll() is None:
            run["proc"].kill()
    assert run["proc"].returncode == 0, stderr[-3000:]
    out = {}
    for name in JOBS:
        stdout = (run["out"] / f"{name}.out").read_text()
        rc = (run["out"] / f"{name}.rc").read_text()
        assert rc == "0", f"{name}: rc={rc}\n{(run['out'] / f'{name}.err').read_text()[-3000:]}"
        lines = ([json.loads(l) for l in stdout.splitlines() if l.startswith("{")]
                 if name in ("small", "kernels") else None)
        out[name] = {r["case"]: r for r in lines} if lines else json.loads(stdout)
    shutil.rmtree(run["out"], ignore_errors=True)
    return out


def _check_compiled_and_fitting(r):
    assert r["fits"] is True and isinstance(r["bytes_per_chip"], int)
    assert 1 * GiB < r["bytes_per_chip"] <= r["hbm_bytes_per_chip"] == 16 * GiB
    assert r["attempts"][-1]["source"] == "compiled" and not r["estimate"]
    m = r["memory"]
    # XLA's argument size is the sum of our shards of every argument (an independent count).
    assert abs(m["arguments"] - (m["frozen"] + m["params"] + m["opt_state"] + m["batch"])) <= 0.001 * m["arguments"]
    assert m["temporaries"] > 0 and r["bytes_per_chip"] == (m["arguments"] + m["outputs"] - m["donated"]
                                                          + m["temporaries"] + m["code"])
    # The compiler counts at least the model FLOPs of this chip's quarter of the step (remat adds a forward).
    per_chip = r["model_flops_per_step"] / 4
    assert per_chip <= r["flops_per_chip"] <= (1.6 if r["remat"] == "full" else 1.3) * per_chip
    assert 0 < r["mfu"] <= 1 and r["step_seconds"] > 0 and r["tokens_per_second"] > 0


def test_8b_on_v5e_2x2_compiles_and_reports_numbers(runs):
    r = runs["8b"]
    _check_compiled_and_fitting(r)
    # remat auto: without remat (or saving only the projections, dots), batch 8 x 2048 needs more than 16 GiB;
    # with per-layer remat it fits. auto tries the policies in AUTO_ORDER, passing over estimates over HBM.
    remats = [a["remat"] for a in r["attempts"]]
    assert remats[0] == "none" and remats[-1] == "full" and set(remats) <= set(AUTO_ORDER)
    assert not any(a["fits"] for a in r["attempts"][:-1])
    assert r["remat"] == "full" and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}


def test_8b_in_nf4_on_v5e_2x2_fits(runs):
    r = runs["8b-nf4"]
    assert r["quantize"] == "nf4" and r["remat"] == "full"  # as the bf16 plan chose: comparable bytes
    _check_compiled_and_fitting(r)
    # Frozen bytes per chip, counted from the architecture: the 7 projections of 32 layers at 4 + 8/64
    # + 32/(64*256) bits per weight (double quant, blocksize 64), the other 1.05B weights in bf16, over 4.
    projections = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    rest = 8_030_261_248 - projections
    want = (projections * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + 2 * rest) / 4
    assert abs(r["memory"]["frozen"] - want) <= 0.005 * want, (r["memory"]["frozen"], want)
    assert r["bytes_per_chip"] < runs["8b"]["bytes_per_chip"]
    # The load report counts the loader's shards: the frozen arguments of the compiled step, to the byte.
    assert r["load"]["device_bytes"] == r["memory"]["frozen"] and r["load"]["fits"] is True
    assert r["load"]["device_bytes"] < r["load"]["device_peak_bytes"] < 16 * GiB
    assert r["scan_layers"] is True and r["compile_seconds"] > r["attempts"][-1]["lower_seconds"] > 0


def test_70b_in_bf16_on_four_16gb_chips_does_not_fit(runs):
    r = runs["70b"]
    assert r["fits"] is False
    assert r["bytes_per_chip"] > 2 * r["hbm_bytes_per_chip"]  # 141 GB of bf16 weights over 4 chips
    assert r["attempts"][0]["source"] == "arguments alone"
    s = r["suggestion"]
    assert s is not None and s["topology"].startswith("v5e:") and s["bytes_per_chip"] <= 16 * GiB
    assert int(eval(s["topology"].split(":")[1].replace("x", "*"))) > 4


def test_memory_grows_with_batch(runs):
    b = [runs["small"][f"batch{n}"]["bytes_per_chip"] for n in (4, 8)]
    assert b[0] < b[1], b
    t = [runs["small"][f"batch{n}"]["memory"]["temporaries"] for n in (4, 8)]
    assert t[0] < t[1], t


def test_memory_shrinks_with_more_fsdp(runs):
    s = runs["small"]
    data4, data2, fsdp4 = (s[k]["bytes_per_chip"] for k in ("data4", "data2_fsdp2", "fsdp4"))
    assert data4 > data2 > fsdp4, (data4, data2, fsdp4)
    frozen = [s[k]["memory"]["frozen"] for k in ("data4", "data2_fsdp2", "fsdp4")]
    assert frozen[0] > frozen[1] > frozen[2] > 0


def test_every_micro_batch_counts_in_the_cost(runs):
    one, two = runs["small"]["batch8"], runs["small"]["accum2"]  # 8 rows at once vs 2 x 4 rows
    assert abs(two["flops_per_chip"] - one["flops_per_chip"]) <= 0.05 * one["flops_per_chip"]
    assert two["model_flops_per_step"] == one["model_flops_per_step"]
    assert two["memory"]["temporaries"] < one["memory"]["temporaries"]


def test_train_step_with_pallas_kernels_compiles_for_every_generation(runs):
    """The whole LoRA and QLoRA step with every adapted projection on the Pallas kernels (under shard_map)."""
    cases = dict(runs["kernels"])
    xla = cases.pop("v5e nf4 xla")
    assert xla["fits"] and xla["attempts"][-1]["kernel_calls"] == 0
    assert sorted(cases) == sorted([f"{g} {q}" for g in ("v4", "v5e", "v5p", "v6e") for q in ("bf16", "nf4")]
                                   + ["v5e bf16 tensor", "v5e nf4 tensor"])
    for name, r in cases.items():
        attempt = r["attempts"][-1]
        assert attempt["source"] == "compiled" and r["fits"], name
        assert attempt["kernel_calls"] and attempt["kernel_calls"] > 0, (name, attempt["kernel_calls"])
