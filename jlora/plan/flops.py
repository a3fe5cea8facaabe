"""Model FLOPs of one LoRA training step, counted from the architecture (for MFU).

Per token, with N = the frozen matmul weights (7 projections per layer + lm_head), L layers,
T the sequence length, d = heads * head_dim, and r (in + out) summed over the adapted projections:

    base       4 N           forward 2N + input gradient 2N; the frozen weights get no gradient
    adapters   6 r (in+out)  forward, input gradient and weight gradient of A and B
    attention  12 L T d      q k^T and p v (4 L T d forward) and their backward (8 L T d), unmasked

(PaLM's 6N + 12 L H Q T, appendix B, arXiv 2204.02311, with LoRA's 4N: shared/REFERENCE.md section 5.)
Recomputation under remat is not model FLOPs: it shows in the compiler's count, not here.
"""
from __future__ import annotations

from jlora.llama_config import LlamaConfig
from jlora.lora_config import LoraConfig


def frozen_matmul_params(config: LlamaConfig) -> int:
    """Weights of every matmul a token goes through: the 7 projections of each layer and the output head."""
    per_layer = sum(i * o for i, o in config.linear_shapes().values())
    return config.num_hidden_layers * per_layer + config.hidden_size * config.vocab_size


def adapter_width(config: LlamaConfig, lora: LoraConfig) -> int:
    """sum of r * (in + out) over the adapted projections of all layers (= trainable parameters)."""
    total = 0
    for layer in range(config.num_hidden_layers):
        for suffix, (i, o) in config.linear_shapes().items():
            sub = "self_attn" if suffix in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{layer}.{sub}.{suffix}"
            if lora.matches(name):
                total += lora.rank_for(name) * (i + o)
    return total


def flops_per_token(config: LlamaConfig, lora: LoraConfig, seq_len: int) -> float:
    attention = 12 * config.num_hidden_layers * seq_len * config.q_features
    return 4 * frozen_matmul_params(config) + 6 * adapter_width(config, lora) + attention


def model_flops_per_step(config: LlamaConfig, lora: LoraConfig, *, tokens: int, seq_len: int) -> float:
    """Model FLOPs of one optimizer step over `tokens` tokens (all chips together)."""
    return tokens * flops_per_token(config, lora, seq_len)


def forward_flops_per_token(config: LlamaConfig, lora: LoraConfig, seq_len: int) -> float:
    """One forward pass (what per-layer remat computes a second time): 2N + 2 r (in+out) + 4 L T d."""
    attention = 4 * config.num_hidden_layers * seq_len * config.q_features
    return 2 * frozen_matmul_params(config) + 2 * adapter_width(config, lora) + attention
