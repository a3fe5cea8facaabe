"""Memory of a LoRA training step: base weights, adapter + optimizer state, and an activation ESTIMATE.

Bytes, with N = batch * seq tokens, D = bytes of the compute dtype (2 for bfloat16), per decoder layer:

    saved(layer) = N * [ (6 h + 2 kv + 4 i) * D            # norm inputs, q k v, attention output,
                                                         #   gate, up, silu(gate), gate*up
                         + heads * seq * (D + 4)           # attention probabilities (dtype) + fp32 softmax
                         + n_adapted * r * 4 ]             # x @ A of each adapter (float32)
    head         = N * vocab * (D + 8)                     # logits, fp32 copy, fp32 log-softmax
    activations  = layers * saved(layer) + head                          (no remat)
                 = layers * N * h * D + saved(layer) + head              (--remat: keep each layer's
                                                                          input, recompute one layer)

h = hidden size, kv = key/value features, i = MLP intermediate size. It counts what the backward pass of
jlora's Llama needs (frozen projections keep no weight gradients; adapters need their inputs) and ignores
XLA's fusion and temporaries, so treat it as an estimate within a small factor, not a measurement.

Adapter + optimizer state: float32 A and B plus AdamW's two float32 moments = 12 bytes per trainable
parameter (the float32 gradient accumulator and a micro-batch's gradient add 8 more during the step).
Base weights: the dtype's bytes per parameter, or NF4 (4.127 bits per projection parameter with double
quantization; embeddings, head and norms in the dtype). These per-parameter figures come from jlora/memory.py,
which jlora.memory_report and `jlora plan` share.
"""
from __future__ import annotations

from jlora import memory
from jlora.llama_config import LlamaConfig
from jlora.ranks.params import base_parameter_count, linear_parameter_count, target_suffixes

ADAPTER_STATE_BYTES_PER_PARAM = memory.ADAPTER_BYTES_PER_PARAM + memory.OPTIMIZER_BYTES_PER_PARAM  # 12
GRADIENT_BYTES_PER_PARAM = memory.STEP_GRADIENT_BYTES_PER_PARAM  # 8
NF4_BITS_PER_PARAM = memory.nf4_bits_per_param()  # 4.127: codes + uint8 absmax + fp32 nested absmax

DTYPES = ("bfloat16", "float16", "float32")


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return memory.dtype_bytes(dtype)


def base_weight_bytes(config: LlamaConfig, dtype: str = "bfloat16", quantize: str | None = None) -> float:
    total = base_parameter_count(config)
    if quantize is None:
        return total * dtype_bytes(dtype)
    if quantize != "nf4":
        raise ValueError(f"--quantize {quantize!r}: only nf4 is supported")
    linear = linear_parameter_count(config)
    return linear * NF4_BITS_PER_PARAM / 8 + (total - linear) * dtype_bytes(dtype)


def adapter_state_bytes(trainable: int) -> int:
    return trainable * ADAPTER_STATE_BYTES_PER_PARAM


def layer_activation_bytes(config: LlamaConfig, *, batch: int, seq: int, r: int, targets="all-linear",
                           dtype: str = "bfloat16") -> float:
    """`saved(layer)` of the module docstring."""
    c, d = config, dtype_bytes(dtype)
    n = batch * seq
    dense = (4 * c.hidden_size + 2 * c.q_features + 2 * c.kv_features + 4 * c.intermediate_size) * d
    attention = c.num_attention_heads * seq * (d + 4)
    adapters = len(target_suffixes(targets, c)) * r * 4
    return n * (dense + attention + adapters)


def activation_bytes(config: LlamaConfig, *, batch: int, seq: int, r: int, targets="all-linear",
                     dtype: str = "bfloat16", remat: bool = False) -> float:
    """The activation estimate of the module docstring, in bytes."""
    c, d = config, dtype_bytes(dtype)
    n = batch * seq
    layer = layer_activation_bytes(config, batch=batch, seq=seq, r=r, targets=targets, dtype=dtype)
    head = n * c.vocab_size * (d + 8)
    if remat:
        return c.num_hidden_layers * n * c.hidden_size * d + layer + head
    return c.num_hidden_layers * layer + head
