"""DoRA (`use_dora=True`) against PEFT's: logits, gradients of A, B and the magnitude, the dropout formula,
both adapter directions, the magnitude init and the merged export. PEFT in float64 is the truth, PEFT in
float32 calibrates the bound (tests/conftest.py float32_close); every adapter has a non-zero B and a
magnitude moved off its init, so m / ||W + sBA|| != 1 and every DoRA term counts."""
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import jlora
from jlora.lora_layer import LoRA, LoRAParam
from jlora.models.layers import Linear
from jlora.peft_model import adapted_modules

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = np.random.RandomState(3).randint(0, 96, (2, 16))
PROBE = np.random.RandomState(4).randn(2, 16, 96)  # loss = sum(logits * PROBE): every logit gets a gradient


def _logits(model, ids=IDS) -> np.ndarray:
    """jlora's logits as one jitted program (op-by-op dispatch compiles every primitive: several times slower)."""
    import jax
    from flax import nnx
    graph, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graph, s)(x))(state, np.asarray(ids)))


def _move_magnitudes(ref, seed=0):
    """m *= 1 + 0.2 N(0, 1) in a PEFT model, so that m / ||W + sBA|| is not 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _peft_grads(ref, ids=IDS) -> dict[str, dict[str, np.ndarray]]:
    """HF module -> {a, b, m}: PEFT's gradients of sum(logits * PROBE), in jlora's orientation."""
    ref.zero_grad()
    logits = ref(torch.tensor(ids)).logits
    (logits * torch.tensor(PROBE, dtype=logits.dtype)).sum().backward()
    out = {}
    for name, mod in ref.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer) and "default" in getattr(mod, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = dict(
                a=mod.lora_A["default"].weight.grad.T.numpy(), b=mod.lora_B["default"].weight.grad.T.numpy(),
                m=mod.lora_magnitude_vector["default"].weight.grad.numpy())
    return out


def _jlora_logits_and_grads(model, ids=IDS):
    """(logits, {HF module: {a, b, m}}) of jlora's model, gradients of sum(logits * PROBE), one jitted program."""
    graph, params, rest = nnx.split(model, LoRAParam, ...)

    def loss(p):
        logits = nnx.merge(graph, p, rest)(jnp.asarray(ids))
        return jnp.sum(logits * PROBE.astype(np.float32)), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
    nnx.update(model, grads)  # the model's adapters now hold their gradients
    return np.asarray(logits), {n: dict(a=np.asarray(m.lora.a[...]), b=np.asarray(m.lora.b[...]),
                                        m=np.asarray(m.lora.magnitude[...])) for n, m in adapted_modules(model)}


@pytest.fixture(scope="module")
def peft_dora(checkpoint, tmp_path_factory):
    """A PEFT DoRA adapter on the tiny Llama (r=4, alpha=8, all 7 projections, B != 0, m moved), saved."""
    import transformers
    path = checkpoint("llama")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                                  target_modules=TARGETS, task_type="CAUSAL_LM")).eval()
    init = {n: p.detach().numpy().copy() for n, p in ref.named_parameters() if "lora_magnitude_vector" in n}
    _move_magnitudes(ref)
    out = tmp_path_factory.mktemp("peft-dora")
    ref.save_pretrained(out)
    return path, ref, out, init


def test_peft_dora_loads_in_jlora_with_equal_logits_and_gradients(peft_dora, close32, rel, monkeypatch):
    """PEFT -> jlora: logits, and the gradients of every A, B and magnitude, equal PEFT's (float32 vs float64),
    on the plain path, the default custom-VJP path (`jlora.kernels.lora_linear` over XLA dots) and the Pallas
    kernel (`--kernels pallas`, in interpret mode here): DoRA rescales the fused op's output."""
    import functools
    from jlora import kernels
    monkeypatch.setattr(kernels, "lora_linear", functools.partial(kernels.lora_linear, interpret=True))
    path, ref, adapter, _ = peft_dora
    ref64 = copy.deepcopy(ref).double()
    want32, want64 = _peft_grads(ref), _peft_grads(ref64)
    with torch.no_grad():
        logits32, logits64 = ref(torch.tensor(IDS)).logits.numpy(), ref64(torch.tensor(IDS)).logits.numpy()
        with ref.disable_adapter():
            plain = ref(torch.tensor(IDS)).logits.numpy()
    assert rel(plain, logits64) > 1e-3, "the adapter must change the logits, or this test proves nothing"
    assert len(want64) == 14 and all(np.abs(g["m"]).max() > 0 for g in want64.values())
    for impl in (None, "default", "pallas"):
        model = jlora.load_adapter(jlora.load_hf(path), adapter)
        if impl != "default":
            jlora.use_kernels(model, impl)
        logits, grads = _jlora_logits_and_grads(model)
        close32(logits, logits32, logits64, what=f"logits impl={impl}")
        assert rel(logits, logits64) <= 1e-5
        assert set(grads) == set(want64)
        for name, g in grads.items():
            for part in ("a", "b", "m"):
                close32(g[part], want32[name][part], want64[name][part], what=f"d{part} {name} impl={impl}")
                assert rel(g[part], want64[name][part]) <= 1e-5, (name, part, impl)


def test_magnitude_init_equals_peft(peft_dora):
    """jlora's init of m on PEFT's A and B (its weight norm of W + sBA) is PEFT's init, to float32 rounding."""
    path, _, adapter, init = peft_dora
    model = jlora.load_adapter(jlora.load_hf(path), adapter)
    for name, m in adapted_modules(model):
        m.lora.init_magnitude(m.kernel.get_value())
        want = init[f"base_model.model.{name}.lora_magnitude_vector.default.weight"]
        np.testing.assert_allclose(np.asarray(m.lora.magnitude[...]), want, rtol=4e-7, err_msg=name)


def test_jlora_dora_loads_in_peft_and_merges_as_peft(checkpoint, close32, rel, tmp_path):
    """jlora -> PEFT: the saved adapter (use_dora, lora_magnitude_vector keys) gives PEFT jlora's logits; the
    init magnitude is ||W + sBA|| (float64 numpy); the merged export equals PEFT's merge_and_unload weights."""
    import transformers
    path = checkpoint("llama")
    model = jlora.get_peft_model(jlora.load_hf(path), jlora.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                        init_lora_weights=False), rngs=nnx.Rngs(5))
    weights = load_file(str(path / "model.safetensors"))
    key = np.random.RandomState(1)
    for name, m in adapted_modules(model):
        w = weights[f"{name}.weight"].astype(np.float64)
        delta = m.lora.scaling * np.asarray(m.lora.b[...], np.float64).T @ np.asarray(m.lora.a[...], np.float64).T
        np.testing.assert_allclose(np.asarray(m.lora.magnitude[...]), np.linalg.norm(w + delta, axis=1), rtol=1e-6)
        m.lora.magnitude[...] = m.lora.magnitude[...] * (1 + 0.2 * key.randn(m.out_features)).astype(np.float32)
    ours = _logits(model)
    jlora.save_pretrained(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert config["use_dora"] is True
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"].shape == (32,)
    assert sum(k.endswith(".lora_magnitude_vector") for k in tensors) == 14

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ref64 = copy.deepcopy(ref).double()
    with torch.no_grad():
        want, want64 = ref(torch.tensor(IDS)).logits.numpy(), ref64(torch.tensor(IDS)).logits.numpy()
    close32(ours, want, want64, what="jlora -> peft logits")

    jlora.save_merged(model, tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    peft32 = ref.merge_and_unload().state_dict()
    peft64 = ref64.merge_and_unload().state_dict()
    for name, _ in adapted_modules(model):
        k = f"{name}.weight"
        assert rel(peft64[k].numpy(), weights[k]) > 1e-3, k  # the merge changed it
        close32(merged[k], peft32[k].numpy(), peft64[k].numpy(), what=f"merged {k}")


@pytest.mark.parametrize("impl", [None, "default"])
def test_dropout_follows_peft_formula(impl, close32):
    """Training with LoRA dropout: y = x W + b + (c - 1) d(x) W + c s d(x) A B (c = m / ||W + sBA||), PEFT's
    lora.Linear given the same dropped input d(x) (jlora's mask, read from a clone of its RNG state)."""
    rng = np.random.RandomState(0)
    lin = Linear(32, 48, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32, init_std=0.2, rngs=nnx.Rngs(0))
    lin.bias[...] = rng.randn(48).astype(np.float32) * 0.1
    lin.lora = LoRA(32, 48, 4, scaling=2.0, dropout=0.5, init_weights=False, rngs=nnx.Rngs(params=1, dropout=2))
    lin.lora.init_magnitude(lin.kernel.get_value())
    lin.lora.magnitude[...] = lin.lora.magnitude[...] * (1 + 0.2 * rng.randn(48)).astype(np.float32)
    jlora.use_kernels(lin, None if impl is None else "auto")
    if impl == "default":
        lin.kernel_impl = "default"
    lin.train()
    x = rng.randn(3, 5, 32).astype(np.float32)
    dropped = np.asarray(nnx.clone(lin).lora.drop(jnp.asarray(x)))
    assert 0 < (dropped == 0).mean() < 1
    ours = np.asarray(lin(x))

    def reference(dtype):
        base = torch.nn.Linear(32, 48).to(dtype)
        with torch.no_grad():
            base.weight.copy_(torch.tensor(np.asarray(lin.kernel[...]).T))
            base.bias.copy_(torch.tensor(np.asarray(lin.bias[...])))
        layer = peft.tuners.lora.Linear(base, "default", peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                                         use_dora=True), r=4, lora_alpha=8).to(dtype)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(lin.lora.a[...]).T))
            layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(lin.lora.b[...]).T))
            layer.lora_magnitude_vector["default"].weight.copy_(torch.tensor(np.asarray(lin.lora.magnitude[...])))
        fixed = torch.tensor(dropped, dtype=dtype)
        layer.lora_dropout["default"] = type("Fixed", (torch.nn.Module,), {"forward": lambda self, t: fixed})()
        layer.train()
        with torch.no_grad():
            return layer(torch.tensor(x, dtype=dtype)).numpy()

    close32(ours, reference(torch.float32), reference(torch.float64), what=f"dropout impl={impl}")


def test_export_of_a_dora_adapter_offers_the_merged_model(peft_dora, close32, tmp_path, capsys):
    """`jlora export` refuses to write a DoRA adapter vLLM would reject, in one line offering --merge; with --merge
    it writes only the merged model, equal to PEFT's merge_and_unload."""
    from jlora.cli import main
    path, ref, adapter, _ = peft_dora
    assert main(["export", str(adapter), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "vLLM cannot serve" in err and "--merge" in err and not (tmp_path / "a").exists()

    assert main(["export", str(adapter), "--out", str(tmp_path / "b"), "--merge", "--base", str(path),
                 "--dtype", "float32"]) == 0
    assert "vllm serve" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["export_report.json", "merged"]
    merged = load_file(str(tmp_path / "b" / "merged" / "model.safetensors"))
    want = copy.deepcopy(ref).merge_and_unload().state_dict()
    want64 = copy.deepcopy(ref).double().merge_and_unload().state_dict()
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        close32(merged[k], want[k].numpy(), want64[k].numpy(), what=k)


def test_trainable_parameters_count_the_magnitudes_as_peft(peft_dora):
    path, ref, adapter, _ = peft_dora
    model = jlora.load_adapter(jlora.load_hf(path), adapter)
    assert jlora.trainable_parameters(model) == tuple(ref.get_nb_trainable_parameters())


def test_phi3_fused_projections_as_peft(tmp_path, close32):
    """Phi-3's fused qkv_proj / gate_up_proj carry one magnitude over all their output rows, as PEFT's: a PEFT
    DoRA adapter loads in jlora with PEFT's logits, and jlora's re-export loads back in PEFT with them."""
    import transformers
    from tests.hf_checkpoints import save_random_model
    path = save_random_model(transformers.Phi3Config(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, sliding_window=8), tmp_path / "phi3")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                                  target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                                                  task_type="CAUSAL_LM")).eval()
    _move_magnitudes(ref)
    ref.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = ref(torch.tensor(IDS)).logits.numpy()
        want64 = copy.deepcopy(ref).double()(torch.tensor(IDS)).logits.numpy()
    model = jlora.load_adapter(jlora.load_hf(path), tmp_path / "peft")
    assert model.model.layers[0].self_attn.qkv_proj.lora.magnitude[...].shape == (64 + 2 * 2 * 16,)
    close32(_logits(model), want, want64, what="phi3 peft -> jlora")
    jlora.save_pretrained(model, tmp_path / "again")
    back = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tmp_path / "again")
    with torch.no_grad():
        close32(back.eval()(torch.tensor(IDS)).logits.numpy(), want, want64, what="phi3 jlora -> peft")


def test_older_peft_magnitude_keys_load(peft_dora, tmp_path):
    """Older PEFT saved m as `<module>.lora_magnitude_vector.default.weight`: read as the same vector."""
    import shutil
    from safetensors.numpy import save_file
    path, _, adapter, _ = peft_dora
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    old = {k + ".default.weight" if k.endswith("lora_magnitude_vector") else k: v for k, v in tensors.items()}
    assert sum(k.endswith(".lora_magnitude_vector.default.weight") for k in old) == 14
    (tmp_path / "old").mkdir()
    shutil.copy(adapter / "adapter_config.json", tmp_path / "old")
    save_file(old, str(tmp_path / "old" / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = jlora.load_adapter(jlora.load_hf(path), tmp_path / "old")
    for name, m in adapted_modules(model):
        np.testing.assert_array_equal(np.asarray(m.lora.magnitude[...]),
                                      tensors[f"base_model.model.{name}.lora_magnitude_vector"])


def test_multi_adapter_generation_refuses_dora(peft_dora):
    """Per-row multi-adapter generation runs plain LoRA only: a DoRA adapter is refused, not served as LoRA."""
    from jlora.generate.multi_lora import build
    path, _, adapter, _ = peft_dora
    with pytest.raises(ValueError, match=r"\['d'\] are DoRA adapters"):
        build(jlora.load_hf(path), {"d": adapter})
