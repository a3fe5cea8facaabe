"""Moved to jlora.models.config (ModelConfig, every family); these names stay importable from here."""
from jlora.models.config import LlamaConfig as LlamaConfig
from jlora.models.config import ModelConfig as ModelConfig
from jlora.models.family import ConfigError as ConfigError
from jlora.models.registry import SUPPORTED_ARCHITECTURES as SUPPORTED_ARCHITECTURES
