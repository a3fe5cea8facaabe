"""`jlora plan`'s load report (jlora.plan.load) against what `load_hf(dir, mesh=...)` really puts on each device.

The loads run in one subprocess with 8 virtual CPU devices (this file as a script; the device count must be
set before JAX starts): for each case it sums, per device, the bytes of every addressable shard of every
array of the loaded model. The plan counts the same from the config alone; the two must be equal, byte for
byte, on every device. A mesh the loader refuses (an axis that does not divide a tensor dimension) is refused
by the plan with the loader's own message.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python test_load_fit.py OUT CKPT
"""
import json
import os
import subprocess
import sys

import pytest

# (mesh, quantize, scan_layers): dense and NF4 (codes/absmax split 8 ways), replicas along data, scanned
CASES = [("fsdp=8", None, False), ("data=2,fsdp=2,tensor=2", None, False), ("fsdp=8", "nf4", False),
         ("fsdp=4,tensor=2", "nf4", True)]


def _case(mesh, quantize, scan):
    return f"{mesh} {quantize or 'dense'}{' scan' if scan else ''}"


@pytest.fixture(scope="module")
def loaded(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("load-fit")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, __file__, str(out), str(checkpoint("llama"))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("mesh,quantize,scan", CASES)
def test_plan_counts_the_bytes_each_device_receives(loaded, checkpoint, mesh, quantize, scan):
    from jlora.plan.load import plan_load
    from jlora.plan.model import model_config
    from jlora.train.sharding import parse_mesh

    got = loaded[_case(mesh, quantize, scan)]
    load = plan_load(model_config(str(checkpoint("llama"))), parse_mesh(mesh, 8), dtype="float32",
                     quantize=quantize, scan_layers=scan)
    assert got == [load.device_bytes] * 8
    assert load.host_share_bytes == 8 * load.device_bytes  # one host holds all 8 devices here
    assert load.device_bytes < load.device_peak_bytes < 2 * load.device_bytes


def test_the_plan_reports_the_load_of_its_mesh(loaded, checkpoint):
    """End to end through plan() (a GPU topology: estimates only, no compile)."""
    from jlora.plan import PlanRequest, plan, to_json

    result = plan(PlanRequest(model=str(checkpoint("llama")), topology="h100:8", mesh="fsdp=8", batch_size=8,
                              seq_len=16, dtype="float32", quantize="nf4", suggest=False, scan_layers=False))
    assert result.load.device_bytes == loaded[_case("fsdp=8", "nf4", False)][0]
    assert to_json(result)["load"]["device_bytes"] == result.load.device_bytes and result.load_fits


def test_a_mesh_the_loader_refuses_is_refused_with_its_error(loaded, checkpoint):
    from jlora.plan import PlanError, PlanRequest, plan

    with pytest.raises(PlanError) as e:
        plan(PlanRequest(model=str(checkpoint("llama")), topology="h100:3", mesh="fsdp=3", batch_size=3,
                         seq_len=16, dtype="float32"))
    assert str(e.value) == loaded["mesh error"]
    assert "model.embed_tokens.weight" in str(e.value) and "'fsdp' of size 3" in str(e.value)


# -- the subprocess ----------------------------------------------------------------------------------------------
def _device_bytes(model) -> list[int]:
    import jax
    from flax import nnx

    per = {d.id: 0 for d in jax.devices()}
    for leaf in jax.tree.leaves(nnx.state(model)):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                per[shard.device.id] += shard.data.nbytes
    return [per[i] for i in sorted(per)]


def main(out, ckpt):
    import warnings

    import jax
    import jlora
    from jlora.train.sharding import make_mesh

    assert jax.device_count() == 8
    report = {}
    for mesh, quantize, scan in CASES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = jlora.load_hf(ckpt, dtype="float32", quantize=quantize, mesh=make_mesh(mesh), scan_layers=scan)
        report[_case(mesh, quantize, scan)] = _device_bytes(model)
    try:
        jlora.load_hf(ckpt, dtype="float32", mesh=make_mesh("fsdp=3", devices=jax.devices()[:3]))
    except ValueError as e:
        report["mesh error"] = str(e)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
