"""`load_hf(dir, scan_layers=True)` builds the stacked arrays while loading (stacked.LayerStackBuilder).

- bit-identical to stacking the loop load afterwards (stack_layers(load_hf(dir))), for Llama (period 1)
  and a 5-layer Gemma 2 (period 2: two scanned groups plus one looped tail layer), NF4 quantized while
  loading too (slow);
- the loop layers' rows are dropped once stacked (stacking does not keep the loop model alive beside it);
- on 8 virtual CPU devices (fsdp=8, a subprocess: the devices must exist before JAX starts) the stacked
  sharded load keeps every stack's layer axis whole and splits the rest as the per-layer rule does, and
  its logits equal the unsharded loop load's (float32 rel <= 1e-5) and transformers' (float64 bound).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python test_stacked_load.py OUT CKPT
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

IDS = np.random.RandomState(3).randint(0, 96, (2, 16))
GEMMA2 = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=6,
              query_pre_attn_scalar=24, num_hidden_layers=5, attn_logit_softcapping=2.0,
              final_logit_softcapping=3.0)


def _flat(model):
    """{path: array} of every array leaf of the model's state (an NF4Tensor's codes, absmax, ... included)."""
    import jax
    from flax import nnx
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


@pytest.fixture(scope="module")
def gemma2_5(tmp_path_factory):
    import transformers
    from tests.hf_checkpoints import save_random_model
    return save_random_model(transformers.Gemma2Config(**GEMMA2), tmp_path_factory.mktemp("gemma2-5-load"),
                             norm_mean=0.0, norm_std=0.5, weight_std=0.25)


@pytest.mark.parametrize("which", ["llama", "gemma2"])
def test_direct_stacked_load_is_stack_of_loop_load(which, checkpoint, gemma2_5):
    import jlora
    from jlora.models.stacked import is_stacked, stack_layers
    path = checkpoint("llama") if which == "llama" else gemma2_5
    direct = jlora.load_hf(path, scan_layers=True)
    assert is_stacked(direct)
    stack = direct.model.layers
    assert (stack.period, stack.groups, len(stack.tail)) == ((1, 2, 0) if which == "llama" else (2, 2, 1))
    _assert_same(direct, stack_layers(jlora.load_hf(path)))


@pytest.mark.slow  # eager NF4 quantization of every projection twice (~20 s under load)
def test_direct_stacked_nf4_load_is_stack_of_loop_load(checkpoint):
    import jlora
    from jlora.models.stacked import stack_layers
    direct = jlora.load_hf(checkpoint("llama"), quantize="nf4", scan_layers=True)
    assert direct.model.layers.group[0].mlp.up_proj.kernel.get_value().codes.shape[0] == 2
    _assert_same(direct, stack_layers(jlora.load_hf(checkpoint("llama"), quantize="nf4")))


def test_stacking_drops_the_loop_rows(checkpoint):
    """Once a variable is stacked its per-layer rows are released (abstract), so the loop copy and the
    stacked copy are never both alive in full."""
    import jax
    import jlora
    from jlora.models.stacked import stack_layers
    model = jlora.load_hf(checkpoint("llama"))
    old = list(model.model.layers)
    stack_layers(model)
    kernels = [layer.self_attn.q_proj.kernel.get_value() for layer in old]
    assert all(isinstance(k, jax.ShapeDtypeStruct) for k in kernels)


def test_sharded_stacked_load_on_8_devices(checkpoint, tmp_path, hf_model, close32, logits32_and_64, rel):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), str(checkpoint("llama"))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["stacked"] and report["specs"], report
    for name, spec in report["specs"].items():  # layer axis whole; the rest as the loop's rule
        assert spec[0] is None and spec[1:] == report["row_specs"][name], (name, spec)
    assert report["split"] > 0 and report["device_bytes"] == [report["device_bytes"][0]] * 8, report
    got, loop = np.load(tmp_path / "stacked.npy"), np.load(tmp_path / "loop-single.npy")
    want, want64 = logits32_and_64(hf_model(checkpoint("llama")), IDS)
    close32(got, want, want64, what="stacked fsdp=8")
    assert rel(got, loop) <= 1e-5


# -- the subprocess ----------------------------------------------------------------------------------------------
def _subprocess(out: Path, ckpt: str) -> None:
    import jax
    from flax import nnx

    import jlora
    from jlora.convert.mesh_rules import param_spec
    from jlora.models.stacked import is_stacked
    from jlora.train.sharding import make_mesh

    def logits(model):
        graph, state = nnx.split(model)
        return np.asarray(jax.jit(lambda s, x: nnx.merge(graph, s)(x))(state, IDS))

    mesh = make_mesh("fsdp=8")
    model = jlora.load_hf(ckpt, mesh=mesh, scan_layers=True)
    specs, row_specs, split, device_bytes = {}, {}, 0, [0] * 8
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = ".".join(map(str, path))
        value = var.get_value()
        for d, shard in enumerate(value.addressable_shards):
            device_bytes[shard.device.id] += shard.data.nbytes
        if ".layers.group." in name:
            specs[name] = list(value.sharding.spec) + [None] * (value.ndim - len(value.sharding.spec))
            row = list(param_spec(name.replace(".layers.group.", ".layers.", 1), value.shape[1:], mesh))
            row_specs[name] = row + [None] * (value.ndim - 1 - len(row))
            split += any(specs[name])
    np.save(out / "stacked.npy", logits(model))
    np.save(out / "loop-single.npy", logits(jlora.load_hf(ckpt)))
    (out / "report.json").write_text(json.dumps(dict(stacked=is_stacked(model), specs=specs, row_specs=row_specs,
                                                     split=split, device_bytes=device_bytes)))


if __name__ == "__main__":
    _subprocess(Path(sys.argv[1]), sys.argv[2])
