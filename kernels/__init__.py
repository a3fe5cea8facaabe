"""Fused LoRA kernels with custom gradients.

    lora_linear:      y = x @ w + scale * (x @ a) @ b                 (dense frozen w)
    nf4_lora_linear:  y = x @ dequantize(w_nf4).T + scale * (x @ a) @ b   (QLoRA)

Each has a plain-jnp reference beside it; backends are Pallas (TPU), Triton
(GPU, through jax-triton) and XLA (see dispatch.py for impl="auto").
"""

from jlora.kernels.block_sizes import TRITON_BLOCK_SIZES
from jlora.kernels.block_sizes import BlockSizes
from jlora.kernels.lora_linear import IMPLS
from jlora.kernels.lora_linear import lora_linear
from jlora.kernels.lora_linear import lora_linear_reference
from jlora.kernels.nf4_lora_linear import nf4_lora_linear
from jlora.kernels.nf4_lora_linear import nf4_lora_linear_reference
