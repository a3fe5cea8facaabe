"""QLoRA training: NF4 stays frozen and out of the optimizer, LoRA gradients equal PEFT on bitsandbytes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

import jlora
from jlora.nf4 import NF4Tensor
from jlora.train.optimizer import make_optimizer
from jlora.train.state import SplitModel


def _is_nf4(x):
    return isinstance(x, NF4Tensor)


@pytest.fixture(scope="module")
def qlora(bnb_dir):
    cfg = jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    return jlora.get_peft_model(jlora.load_hf(bnb_dir), cfg, rngs=nnx.Rngs(5))


def test_nf4_is_frozen_and_never_in_optimizer_state(qlora):
    split = SplitModel.of(qlora)
    params = split.params()
    assert params and all(".lora." in k for k in params)
    assert not any(_is_nf4(x) for x in jax.tree.leaves(params, is_leaf=_is_nf4))
    frozen = [v for _, v in nnx.to_flat_state(split.frozen) if isinstance(v, jlora.NF4Weight)]
    assert len(frozen) == 2 * 7
    tx = make_optimizer(lambda s: 1e-2)
    opt_state = tx.init(params)
    assert not any(_is_nf4(x) or getattr(x, "dtype", None) == jnp.uint8
                   for x in jax.tree.leaves(opt_state, is_leaf=_is_nf4))
    assert not isinstance(jlora.NF4Weight(0), nnx.Param)  # so Param/LoRAParam filters never select it


def test_lora_grads_equal_peft_on_bitsandbytes(qlora, bnb_dir, ids, ref, rel, tmp_path):
    """d(sum(logits * R))/d(A, B) through the NF4 base equals torch autograd through bitsandbytes."""
    r = np.random.RandomState(1).standard_normal((*ids.shape, 96)).astype(np.float32)
    split = SplitModel.of(qlora)

    def scalar(params):
        return jnp.sum(split.model(params, split.frozen)(ids) * r)

    grads = jax.jit(jax.grad(scalar))(split.params())  # NF4 sits in split.frozen: not differentiated
    assert sorted(grads) == sorted(split.params())

    jlora.save_pretrained(qlora, tmp_path / "adapter")
    model = peft.PeftModel.from_pretrained(ref.load_bnb(bnb_dir), tmp_path / "adapter", is_trainable=True)
    model.eval()  # no dropout (there is none); bitsandbytes' 4-bit matmul runs its autograd path
    (model(torch.tensor(ids)).logits * torch.from_numpy(r)).sum().backward()
    checked = 0
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        module = name.removeprefix("base_model.model.").split(".lora_")[0]
        ours = grads[f"{module}.lora.{'a' if '.lora_A.' in name else 'b'}"]
        err = rel(np.asarray(ours).T, p.grad.numpy())
        assert err <= 1e-4, (name, err)
        checked += 1
    assert checked == 2 * 7 * 2

    assert jlora.trainable_parameters(qlora) == tuple(model.get_nb_trainable_parameters())


def test_trainable_parameters_count_4bit_as_peft(bnb_dir, ref):
    """PEFT counts a Params4bit as twice its packed bytes; jlora counts NF4 weights the same way."""
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    want = peft.get_peft_model(ref.load_bnb(bnb_dir), cfg).get_nb_trainable_parameters()
    model = jlora.get_peft_model(jlora.load_hf(bnb_dir), jlora.LoraConfig(r=8, lora_alpha=16, target_modules="qv"),
                                 rngs=nnx.Rngs(0))
    assert jlora.trainable_parameters(model) == tuple(want)


def test_memory_report_of_an_abstract_8b():
    """The planning call: quantize an abstract model under nnx.eval_shape; nothing is allocated."""
    cfg = jlora.preset_config("llama-3.1-8b")
    model = nnx.eval_shape(lambda: jlora.quantize_model(jlora.init_random(cfg, dtype="bfloat16")))
    report = jlora.memory_report(model)
    assert report.bits_per_quantized_parameter <= 4.13
    proj = sum(i * o for i, o in cfg.linear_shapes().values()) * cfg.num_hidden_layers
    assert report.quantized_params == proj
    dense = 2 * (2 * cfg.vocab_size * cfg.hidden_size + (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size)
    assert report.dense_base == dense and report.dense_dtypes == ("bfloat16",)
    assert 3.3 * 2**30 < report.quantized_base < 3.4 * 2**30  # 6.98e9 weights at 4.127 bits


def test_memory_report_by_kind(qlora, capsys):
    split = SplitModel.of(qlora)
    opt_state = make_optimizer(lambda s: 1e-3).init(split.params())
    report = jlora.memory_report(qlora, opt_state)
    trainable, _ = jlora.trainable_parameters(qlora)
    assert report.adapters == 4 * trainable
    assert 2 * report.adapters <= report.optimizer_state <= 2 * report.adapters + 64  # AdamW mu, nu + counts
    assert report.total == report.quantized_base + report.dense_base + report.adapters + report.optimizer_state
    jlora.print_trainable_parameters(qlora)
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("trainable params: ") and "|| all params: " in first
    assert second.startswith("memory: NF4 base ") and "bits/param" in second and "adapters" in second


def test_jlora_train_quantize_nf4(tmp_path):
    from jlora.cli import main
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quantize", "nf4", "--steps", "6", "--eval-every", "0",
                 "--save-every", "0", "--batch-size", "8", "--seq-len", "32", "--no-progress"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and records[-1]["loss"] < records[0]["loss"]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and (out / "adapter" / "adapter_model.safetensors").exists()
    run = json.loads((out / "run_config.json").read_text())
    assert run["quantize"] == "nf4"



def test_nf4_sharding_specs():
    """Codes and absmax split along their flat axis over (fsdp, tensor) in whole blocks, else replicate."""
    import types
    from jax.sharding import PartitionSpec as P
    from jlora.train.sharding import nf4_specs

    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 4, "tensor": 2})
    q = jax.eval_shape(lambda w: jlora.nf4.quantize(w), jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16))
    specs = nf4_specs(q, mesh)
    assert (specs.codes, specs.absmax) == (P(("fsdp", "tensor")), P(("fsdp", "tensor")))
    assert (specs.nested_absmax, specs.offset, specs.nested_code) == (P(), P(), P())
    odd = jax.eval_shape(lambda w: jlora.nf4.quantize(w), jax.ShapeDtypeStruct((3, 64), jnp.bfloat16))
    assert nf4_specs(odd, mesh).codes == P()  # 3 blocks do not split 8 ways
    assert nf4_specs(q, types.SimpleNamespace(shape={"data": 8, "fsdp": 1, "tensor": 1})).codes == P()
