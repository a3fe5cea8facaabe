"""Moved to jlora.models (layers.py, attention.py, decoder.py); these names stay importable from here."""
from jlora.attention import attention_mask as attention_mask
from jlora.models.attention import Attention as Attention
from jlora.models.config import LlamaConfig as LlamaConfig
from jlora.models.decoder import CausalLM as CausalLM
from jlora.models.decoder import DecoderLayer as DecoderLayer
from jlora.models.decoder import LlamaForCausalLM as LlamaForCausalLM
from jlora.models.decoder import LlamaModel as LlamaModel
from jlora.models.decoder import abstract_model as abstract_model
from jlora.models.decoder import init_random as init_random
from jlora.models.layers import DEFAULT_KERNELS as DEFAULT_KERNELS
from jlora.models.layers import MLP as MLP
from jlora.models.layers import Embedding as Embedding
from jlora.models.layers import Linear as Linear
from jlora.models.layers import RMSNorm as RMSNorm
from jlora.models.layers import use_kernels as use_kernels
