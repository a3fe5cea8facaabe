"""NF4 (4-bit NormalFloat) weights, stored bit-identically to bitsandbytes.

    q = jlora.nf4.quantize(w, blocksize=64, double_quant=True)   # w: [out, in], torch orientation
    w_hat = jlora.nf4.dequantize(q, jnp.bfloat16)
    tensors = jlora.nf4.to_bnb_tensors(q)                       # transformers' safetensors layout
"""
from jlora.nf4.bnb_layout import from_bnb_tensors
from jlora.nf4.bnb_layout import to_bnb_tensors
from jlora.nf4.codebook import BLOCKSIZES
from jlora.nf4.codebook import DYNAMIC_CODE
from jlora.nf4.codebook import NESTED_BLOCKSIZE
from jlora.nf4.codebook import NF4_CODE
from jlora.nf4.dequantize import dequantize
from jlora.nf4.quantize import quantize
from jlora.nf4.tensor import NF4Tensor
