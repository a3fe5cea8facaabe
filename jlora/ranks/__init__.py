"""Choosing, checking and cutting LoRA ranks: parameter and memory tables, rank sweeps, adapter spectra,
SVD truncation to a vLLM `--max-lora-rank`. Works on adapters PEFT, Unsloth or jlora wrote."""
from jlora.ranks.params import base_parameter_count
from jlora.ranks.params import lora_parameter_count
from jlora.ranks.params import resolve_model
from jlora.ranks.params import trainable_percent
from jlora.ranks.memory import activation_bytes
from jlora.ranks.memory import base_weight_bytes
from jlora.ranks.advice import advice_lines
from jlora.ranks.adapter import read_adapter
from jlora.ranks.adapter import resolve_adapter_dir
from jlora.ranks.spectrum import factored_svd
from jlora.ranks.spectrum import effective_rank
from jlora.ranks.truncate import truncate
from jlora.ranks.usage import rank_usage
from jlora.ranks.usage import usage_summary
from jlora.ranks.export import build_export
from jlora.ranks.export import export_violations
from jlora.ranks.drift import logit_drift
from jlora.ranks.drift import DriftProbe
from jlora.ranks.verdict import DRIFT_THRESHOLD
from jlora.ranks.verdict import recommend_max_lora_rank
from jlora.ranks.verdict import verdict
from jlora.ranks.sweep import run_sweep
