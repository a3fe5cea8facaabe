"""QLoRA + DoRA: an NF4 base (bitsandbytes' 4-bit checkpoint) with a PEFT DoRA adapter, against PEFT +
bitsandbytes (float32) and, as the float64 truth, PEFT on a dense float64 copy whose projections are
bitsandbytes' own dequantized weights (the same function of x in exact arithmetic).

Sizes are multiples of 64 and bitsandbytes' AVX-512 BF16 CPU path is off, as in tests/qlora/conftest.py."""
import copy

import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file

import jlora
from jlora.peft_model import adapted_modules

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = np.random.RandomState(0).randint(0, 96, (2, 12))


def _bnb(path, quantize=False):
    import bitsandbytes as bnb
    import transformers
    kw = {}
    if quantize:
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32, **kw)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model.eval()


def _logits(model, ids=IDS) -> np.ndarray:
    """jlora's logits as one jitted program (op-by-op dispatch compiles every primitive: several times slower)."""
    import jax
    from flax import nnx
    graph, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graph, s)(x))(state, np.asarray(ids)))


@pytest.fixture(scope="module")
def nf4_dora(tmp_path_factory):
    """(bnb checkpoint dir, PEFT+bnb DoRA model, its adapter dir, PEFT's init magnitudes, dense float64 twin)."""
    import bitsandbytes.functional as F
    import transformers
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)).eval()
    base = tmp_path_factory.mktemp("dora-nf4-base")
    dense.save_pretrained(base)
    bnb_dir = tmp_path_factory.mktemp("dora-nf4-bnb")
    _bnb(base, quantize=True).save_pretrained(bnb_dir)

    ref = peft.get_peft_model(_bnb(bnb_dir), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS,
                                                             init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    init = {n.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector.default.weight"):
            p.detach().numpy().copy() for n, p in ref.named_parameters() if "lora_magnitude_vector" in n}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    adapter = tmp_path_factory.mktemp("dora-nf4-adapter")
    ref.save_pretrained(adapter)

    twin = copy.deepcopy(dense)  # projections: bitsandbytes' dequantized weights
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, peft.tuners.lora.LoraLayer) and "default" in getattr(mod, "lora_A", {}):
                w = mod.get_base_layer().weight
                twin.get_submodule(name.removeprefix("base_model.model.")).weight.copy_(
                    F.dequantize_4bit(w.data, w.quant_state))
    return bnb_dir, ref, adapter, init, twin


def test_nf4_dora_logits_equal_peft_bitsandbytes(nf4_dora, close32, rel):
    bnb_dir, ref, adapter, _, twin = nf4_dora
    with torch.no_grad():
        want = ref(torch.tensor(IDS)).logits.numpy()
        want64 = peft.PeftModel.from_pretrained(copy.deepcopy(twin).double(), adapter)(torch.tensor(IDS)).logits.numpy()
        with ref.disable_adapter():
            plain = ref(torch.tensor(IDS)).logits.numpy()
    assert rel(plain, want64) > 1e-3, "the adapter must change the logits, or this test proves nothing"
    model = jlora.load_adapter(jlora.load_hf(bnb_dir, dtype="float32"), adapter)
    assert all(isinstance(m.kernel, jlora.NF4Weight) for _, m in adapted_modules(model))
    close32(_logits(model), want, want64, what="NF4 + DoRA logits")


def test_nf4_magnitude_init_equals_peft(nf4_dora):
    """m at init: jlora's norm of the dequantized NF4 weight + sBA is PEFT's (on PEFT's A and B)."""
    bnb_dir, _, adapter, init, _ = nf4_dora
    model = jlora.load_adapter(jlora.load_hf(bnb_dir, dtype="float32"), adapter)
    for name, m in adapted_modules(model):
        m.lora.init_magnitude(m.kernel.get_value())
        np.testing.assert_allclose(np.asarray(m.lora.magnitude[...]), init[name], rtol=1e-6, err_msg=name)


def test_nf4_merged_export_equals_peft_merge(nf4_dora, close32, rel, tmp_path):
    """save_merged of the NF4 + DoRA model: PEFT's DoRA merge of the dequantized weight (PEFT's bnb merge computes
    the same before quantizing it again), float32 against the float64 twin's merge_and_unload."""
    bnb_dir, _, adapter, _, twin = nf4_dora
    model = jlora.load_adapter(jlora.load_hf(bnb_dir, dtype="float32"), adapter)
    jlora.save_merged(model, tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    want = peft.PeftModel.from_pretrained(copy.deepcopy(twin), adapter).merge_and_unload().state_dict()
    want64 = peft.PeftModel.from_pretrained(copy.deepcopy(twin).double(), adapter).merge_and_unload().state_dict()
    for name, _ in adapted_modules(model):
        k = f"{name}.weight"
        assert rel(want64[k].numpy(), twin.state_dict()[k].numpy()) > 1e-3, k
        close32(merged[k], want[k].numpy(), want64[k].numpy(), what=f"merged {k}")
