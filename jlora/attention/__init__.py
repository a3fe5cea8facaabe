"""Attention backends: the same masked softmax attention, computed whole (reference) or by blocks.

See backends.py for the setting (`attention="auto" | "blockwise" | "reference"`).
"""
from jlora.attention.backends import BACKENDS as BACKENDS
from jlora.attention.backends import DEFAULT_BACKEND as DEFAULT_BACKEND
from jlora.attention.backends import attend as attend
from jlora.attention.backends import check_backend as check_backend
from jlora.attention.backends import use_attention as use_attention
from jlora.attention.blockwise import BlockSizes as BlockSizes
from jlora.attention.blockwise import blockwise_attention as blockwise_attention
from jlora.attention.masks import attention_mask as attention_mask
from jlora.attention.reference import reference_attention as reference_attention
