"""On 8 virtual CPU devices the sharded step equals the single-device step (float32, rel <= 1e-5)."""
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
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errors) == {"data=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2 kernels",
                           "data=2,fsdp=2,tensor=2 kernels", "data=2,fsdp=2,tensor=2 kernels nf4"}
    for mesh, err in errors.items():
        assert err <= 1e-5, (mesh, err)


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
