"""Fused LoRA kernels: ``y = x @ w + scale * (x @ a) @ b`` with custom gradients."""

from jlora.kernels.block_sizes import BlockSizes
from jlora.kernels.lora_linear import IMPLS
from jlora.kernels.lora_linear import lora_linear
from jlora.kernels.lora_linear import lora_linear_reference
