"""DoRA at generation: greedy tokens equal PEFT's generate (dense base, and an NF4 base against PEFT +
bitsandbytes), and the jitted prefill / decode carry c = m / ||W + sBA|| as data (jlora.dora.inference_view)
instead of recomputing the norm: no [in, out] product or reduction is left in them, and a new adapter of the
same structure reuses the compiled programs."""
import jax
import numpy as np
import peft
import pytest
import torch
from flax import nnx

import jlora
from jlora.dora import inference_view
from jlora.generate import decode as decode_mod
from jlora.generate.decode import generate_tokens
from jlora.peft_model import adapted_modules
from tests.ecosystem.test_dora_nf4 import _bnb
from tests.generate.test_greedy import hf_greedy

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
N = 16
LENGTHS = (5, 11, 3)


def _prompts():
    rng = np.random.RandomState(5)
    return [rng.randint(3, 96, n).tolist() for n in LENGTHS]


def _peft_dora(base_model, out_dir):
    """A PEFT DoRA adapter (r=4, alpha=8, all 7 projections) with B scaled up and m moved off its init, so
    both the low-rank path and m / ||W + sBA|| change the greedy tokens; saved to out_dir."""
    torch.manual_seed(0)
    ref = peft.get_peft_model(base_model, peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS,
                                                          init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.mul_(10.0)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.randn(p.shape, generator=g))
    ref.save_pretrained(out_dir)
    return ref


@pytest.fixture(scope="module")
def dense_dora(tmp_path_factory):
    import transformers
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("dora-gen-base")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)).save_pretrained(base)
    adapter = tmp_path_factory.mktemp("dora-gen-adapter")
    _peft_dora(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), adapter)
    return base, adapter


@pytest.mark.parametrize("base_kind", ["dense", pytest.param("nf4", marks=pytest.mark.slow)])
def test_greedy_dora_generation_equals_peft(base_kind, dense_dora, hf_model, tmp_path):
    """jlora's greedy tokens with a DoRA adapter equal PeftModel.generate's (float32) token for token:
    on the dense base, and on the bitsandbytes NF4 base (PEFT + bitsandbytes as the reference)."""
    base, adapter = dense_dora
    prompts = _prompts()
    if base_kind == "nf4":
        base_dir = tmp_path / "bnb"
        _bnb(base, quantize=True).save_pretrained(base_dir)
        adapter = tmp_path / "adapter"
        ref = _peft_dora(_bnb(base_dir), adapter)
        plain = _bnb(base_dir)
    else:
        base_dir = base
        ref = peft.PeftModel.from_pretrained(hf_model(base), adapter).eval()
        plain = hf_model(base)
    want, gap = hf_greedy(ref, prompts, N, None)
    assert gap > 1e-5, f"transformers' top-2 logits differ by only {gap}; pick other prompts"
    assert hf_greedy(plain, prompts, N, None)[0] != want, "the adapter must change the greedy tokens"
    model = jlora.load_adapter(jlora.load_hf(base_dir, dtype="float32"), adapter, rngs=nnx.Rngs(0))
    assert all(m.lora.magnitude is not None for _, m in adapted_modules(model))
    if base_kind == "nf4":
        assert all(isinstance(m.kernel, jlora.NF4Weight) for _, m in adapted_modules(model))
    got = generate_tokens(model, prompts, max_new_tokens=N)
    assert [g.token_ids for g in got] == want


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (while bodies, scans, jit calls)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


def _weight_sized(jaxpr, shapes) -> list[str]:
    """The products that make an [in, out] array and the reductions over one: the per-call
    work of ||W + sBA|| (s A B, the column sums of squares), which no prefill or decode step needs."""
    found = []
    for eqn in _eqns(jaxpr):
        name = eqn.primitive.name
        if name == "dot_general" and tuple(eqn.outvars[0].aval.shape) in shapes:
            found.append(f"dot_general -> {eqn.outvars[0].aval.shape}")
        if name.startswith("reduce_") and tuple(eqn.invars[0].aval.shape) in shapes:
            found.append(f"{name} of {eqn.invars[0].aval.shape}")
    return found


@pytest.mark.parametrize("layout", ["dense", pytest.param("nf4", marks=pytest.mark.slow),
                                    pytest.param("scanned", marks=pytest.mark.slow)])
def test_generation_carries_the_dora_scale_as_data(layout, monkeypatch):
    """The traced prefill and decode programs hold no weight-sized product or reduction (they did when the
    norm was recomputed every call); the training forward still computes it (the check can fire); a new
    adapter of the same structure (moved magnitudes) reuses both compiled programs."""
    from jlora.models import ModelConfig

    config = ModelConfig(**SIZES, head_dim=SIZES["hidden_size"] // SIZES["num_attention_heads"])
    model = jlora.get_peft_model(jlora.init_random(config),
                                 jlora.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS,
                                                  init_lora_weights=False), rngs=nnx.Rngs(1))
    if layout == "nf4":
        model = jlora.quantize_model(model)
    if layout == "scanned":
        from jlora.models.stacked import stack_layers
        model = stack_layers(model)
    h, i = SIZES["hidden_size"], SIZES["intermediate_size"]
    kv = 2 * h // SIZES["num_attention_heads"]
    shapes = {(h, h), (h, kv), (h, i), (i, h)}  # the [in, out] kernels (no activation here has these shapes)

    graph, state = nnx.split(model)
    forward = jax.make_jaxpr(lambda s: nnx.merge(graph, s)(np.zeros((2, 16), np.int32)))(state)
    assert _weight_sized(forward.jaxpr, shapes), "the training forward computes the norm: the check must see it"
    view = inference_view(model)  # the same function of x, with c precomputed; the model itself is left as it was
    assert all(m.lora.inference_scale is None for _, m in adapted_modules(model))
    assert all(m.lora.inference_scale is not None for _, m in adapted_modules(view))
    logits = [jax.jit(lambda s, g=g: nnx.merge(g, s)(np.asarray([[5, 6, 7, 8]])))(s)
              for g, s in map(nnx.split, (model, view))]
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5, atol=1e-5)

    traced, real = {}, decode_mod.jitted

    def spy(graphdef):
        fns = real(graphdef)

        def wrap(name, fn):
            def call(*args, **kwargs):
                traced[name] = fn.trace(*args, **kwargs).jaxpr
                return fn(*args, **kwargs)
            wrap.fns[name] = fn
            return call
        wrap.fns = {}
        out = tuple(wrap(name, fn) for name, fn in zip(("prefill", "decode"), fns))
        spy.fns = wrap.fns
        return out

    monkeypatch.setattr(decode_mod, "jitted", spy)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    first = generate_tokens(model, prompts, max_new_tokens=4)
    assert set(traced) == {"prefill", "decode"}
    for name, jaxpr in traced.items():
        assert not _weight_sized(jaxpr.jaxpr, shapes), f"{layout} {name}: {_weight_sized(jaxpr.jaxpr, shapes)}"

    compiled = {name: fn._cache_size() for name, fn in spy.fns.items()}
    fns = dict(spy.fns)
    for _, m in nnx.iter_modules(model):
        if getattr(getattr(m, "lora", None), "magnitude", None) is not None:
            m.lora.magnitude.set_value(m.lora.magnitude.get_value() * 3.0)
    second = generate_tokens(model, prompts, max_new_tokens=4)
    assert all(spy.fns[n] is fns[n] and fns[n]._cache_size() == compiled[n] for n in fns), "recompiled"
    assert [o.token_ids for o in first] != [o.token_ids for o in second], "the new magnitudes must be used"
