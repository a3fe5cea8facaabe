"""On 8 virtual CPU devices the sharded step equals the single-device step (see sharded_step_check.py for
why the adapter updates are compared under SGD, and the bound)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jlora.train.sharding import make_mesh, param_spec, parse_mesh


def test_sharded_step_equals_single_device(checkpoint):
    script = Path(__file__).with_name("sharded_step_check.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, str(script), str(checkpoint("llama"))], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = result["errors"]
    assert set(errors) == {"data=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2 nf4",
                           "fsdp=4,tensor=2 kernels", "data=2,fsdp=2,tensor=2 kernels",
                           "data=2,fsdp=2,tensor=2 kernels nf4"}
    # Summation order moves a float32 update by ~1e-5 relative here (AVX-512; the AVX2 order is another
    # of the same size); 1e-4 leaves 10x, while a wrong reduction (a dropped psum on a row-parallel
    # slice) gives ~0.3.
    for mesh, err in errors.items():
        assert err <= 1e-4, (mesh, err)
    assert result["nf4_split"] == 2 * 7, result  # every projection's NF4 codes: 1/8 per device


def test_parse_mesh():
    assert parse_mesh("fsdp=4,tensor=2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert parse_mesh(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="product must equal"):
        parse_mesh("data=3", 8)
    with pytest.raises(ValueError, match="axis=size"):
        parse_mesh("pipeline=2", 8)


def test_adapters_follow_their_base_weight():
    mesh = make_mesh("data=1")
    col, row = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
    assert tuple(param_spec(col + ".lora.a", (4, 2), mesh)) == ("fsdp", None)
    assert tuple(param_spec(col + ".lora.b", (2, 4), mesh)) == (None, "tensor")
    assert tuple(param_spec(row + ".lora.a", (4, 2), mesh)) == ("tensor", None)
    assert tuple(param_spec(row + ".lora.b", (2, 4), mesh)) == (None, "fsdp")
    assert tuple(param_spec(col + ".kernel", (4, 4), mesh)) == ("fsdp", "tensor")
