"""Greedy generation on an NF4 base (jlora's QLoRA load, with an adapter) through the KV cache equals greedy
decoding by the model's own full forward pass, recomputed over the whole sequence at every step (slow).

The NF4 forward itself is checked against bitsandbytes in tests/qlora; here transformers + bitsandbytes'
generate is not the reference: on a CPU with avx512_bf16, bitsandbytes' 4-bit layers take a bfloat16 fast path
(~1e-2 relative from the float32 logits, enough to flip a near-tie within 16 tokens) unless each layer's
`support_avx512bf16_for_cpu` is set False, as tests/qlora/conftest.py does for its exact comparisons."""
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import jlora
from jlora.generate.decode import generate_tokens
from tests.generate.test_greedy import _prompts

N = 12


@pytest.mark.slow
def test_nf4_lora_greedy_equals_full_forward_greedy(tmp_path):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    model = jlora.get_peft_model(jlora.load_hf(tmp_path, quantize="nf4"),
                                 jlora.LoraConfig(r=4, init_lora_weights=False), rngs=nnx.Rngs(0))
    prompts = _prompts()
    got = generate_tokens(model, prompts, max_new_tokens=N)
    for prompt, out in zip(prompts, got):
        seq = list(prompt)
        for _ in range(N):
            seq.append(int(np.asarray(model(np.array([seq])))[0, -1].argmax()))
        assert out.token_ids == seq[len(prompt):]
