"""Attention backends: the same masked softmax attention, computed whole (reference), by blocks in plain
JAX (blockwise), by TPU splash attention (splash), by cuDNN (cudnn) or by Pallas GPU kernels (flash).

See backends.py for the setting (`attention="auto" | "blockwise" | "reference" | "splash" | "cudnn" | "flash"`).
"""
from jlora.attention.backends import BACKENDS as BACKENDS
from jlora.attention.backends import DEFAULT_BACKEND as DEFAULT_BACKEND
from jlora.attention.backends import attend as attend
from jlora.attention.backends import available_backends as available_backends
from jlora.attention.backends import check_backend as check_backend
from jlora.attention.backends import use_attention as use_attention
from jlora.attention.blockwise import BlockSizes as BlockSizes
from jlora.attention.blockwise import blockwise_attention as blockwise_attention
from jlora.attention.masks import attention_mask as attention_mask
from jlora.attention.reference import reference_attention as reference_attention
