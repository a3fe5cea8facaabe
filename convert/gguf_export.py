"""GGUF export (llama.cpp, Ollama) of a transformers checkpoint, e.g. jlora's merged export.

    export_gguf("runs/x/merged", "model.gguf", "q8_0")

Reads the checkpoint's safetensors one tensor at a time and streams each into the GGUF file (header,
metadata and tensor table first, then the data), so memory stays at about one tensor. What llama.cpp's
convert_hf_to_gguf.py does for these families, done here with the same `gguf` package:

- Names: gguf's TensorNameMap for the architecture (``model.layers.3.self_attn.q_proj.weight`` ->
  ``blk.3.attn_q.weight``, ``model.embed_tokens`` -> ``token_embd``, ``model.norm`` -> ``output_norm``,
  ``lm_head`` -> ``output``). A tensor with no GGUF name is an error naming it.
- Llama and Mistral (GGUF architecture "llama"): q_proj / k_proj rows are permuted from transformers'
  rotate-half RoPE layout to llama.cpp's interleaved pairs (``LlamaModel.permute``): per head, the
  rows [r0..r(d/2-1), r(d/2)..r(d-1)] become [r0, r(d/2), r1, r(d/2+1), ...]:
      W.reshape(heads, 2, d/2, in).swapaxes(1, 2).reshape(W.shape)   (heads: n_kv_heads for k_proj)
  Qwen2/Qwen3, Gemma 2/3 and Phi-3 use llama.cpp's NEOX RoPE and keep the transformers layout.
- Gemma 2/3: every ``*norm.weight`` is stored as 1 + w (llama.cpp's RMSNorm scales by w, Gemma's by
  1 + w); the tied head is not written; softcaps and the sliding window are metadata; configs that
  llama.cpp's fixed Gemma assumptions would run differently are refused (see ``_gemma_metadata``).
- Phi-3 / Phi-4: fused ``qkv_proj`` -> ``attn_qkv``, ``gate_up_proj`` -> ``ffn_up``; partial rotary as
  the rope dimension count; longrope as ``rope_factors_long/short`` plus the attention factor.
- Llama 3 RoPE scaling is the ``rope_freqs.weight`` tensor (a divisor per frequency); linear and YaRN
  scaling are metadata.
- Types: 1-D tensors (norms, biases) stay float32, as in llama.cpp. Matrices:

      f32, f16, bf16   every matrix in that type
      q8_0             every matrix Q8_0 (blocks of 32: one f16 scale, 32 int8), like convert_hf_to_gguf
      q4_0             Q4_0 matrices (blocks of 32: one f16 scale, 32 4-bit), token_embd/output in Q8_0
      q4_k_m           llama-quantize's Q4_K_M mix: Q4_K, with the head (output, or a tied token_embd)
                       and the attn_v / ffn_down of the layers llama.cpp's use_more_bits picks (first
                       and last eighth, every third between) in Q6_K; rows not a multiple of 256 fall
                       back to Q5_0 / Q8_0 as there. (llama.cpp's 70B and MoE attn_v upgrades are not
                       made.)

  Any other matrix whose rows are not a multiple of the block size falls back to f16 (as llama.cpp
  does). Q8_0, Q4_0 and Q5_0 are gguf.quants' (the Python port of ggml's reference quantizers); Q4_K
  and Q6_K are jlora.convert.kquants' (gguf has no Python k-quantizer). Other k-quants: export f16,
  then run llama.cpp's ``llama-quantize model-f16.gguf model-q5_k_m.gguf Q5_K_M``.

Metadata: architecture, context length, embedding and feed-forward lengths, block count, heads, kv
heads, head dim (rope dimension count), rope freq base and scaling, RMS norm eps, vocab size, file type,
and the tokenizer with its chat template (jlora.convert.gguf_vocab).
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from jlora.atomic_files import new_file_mode
from jlora.convert.gguf_vocab import add_vocab
from jlora.convert.hf_checkpoint import read_config, weight_files
from jlora.convert.kquants import quantize_q4_k, quantize_q6_k
from jlora.convert.safetensors_io import iter_tensors, read_header



@dataclass(frozen=True)
class Family:
    """How one transformers model_type becomes a llama.cpp architecture."""

    arch: str                  # GGUF general.architecture
    permute: bool = False      # q/k rows to llama.cpp's interleaved RoPE pairs (LlamaModel.permute)
    norm_shift: float = 0.0    # added to every *norm.weight (Gemma's RMSNorm scales by 1 + w; llama.cpp by w)


FAMILIES = {
    "llama": Family("llama", permute=True),
    "mistral": Family("llama", permute=True),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "gemma2": Family("gemma2", norm_shift=1.0),
    "gemma3_text": Family("gemma3", norm_shift=1.0),
    "phi3": Family("phi3"),
}
Q = gguf.GGMLQuantizationType
# --gguf type -> (file type, matrix type, token_embd/output type)
GGUF_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0, Q.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_0, Q.Q8_0),
    "q4_k_m": (gguf.LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K, Q.Q4_K),
}
K_QUANTS = ("q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q3_k_m", "q2_k")
# llama.cpp's fallback for a k-quant matrix whose rows are not a multiple of 256 (llama-quant.cpp)
K_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}


class GGUFExportError(ValueError):
    """A checkpoint or type the GGUF export cannot write."""


@dataclass(frozen=True)
class _Tensor:
    source: str          # transformers name
    name: str            # GGUF name
    shape: tuple         # numpy (row-major) shape
    qtype: gguf.GGMLQuantizationType


def check_type(gguf_type: str) -> str:
    t = gguf_type.lower()
    if t in GGUF_TYPES:
        return t
    hint = (f" ({gguf_type}: export f16, then run llama.cpp's "
            f"`llama-quantize model-f16.gguf model-{t}.gguf {gguf_type.upper()}`)") if t in K_QUANTS else ""
    raise GGUFExportError(f"unknown GGUF type {gguf_type!r}; supported: {', '.join(GGUF_TYPES)}{hint}")


def family(hf: dict, where) -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise GGUFExportError(
            f"{where}: model_type {model_type!r} has no GGUF mapping in jlora's exporter (mapped: "
            f"{', '.join(FAMILIES)}); llama.cpp's convert_hf_to_gguf.py may still convert the merged "
            f"checkpoint if llama.cpp has an architecture for it")
    return FAMILIES[model_type]


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rotate-half rows -> interleaved pairs, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(hf: dict) -> tuple[float, dict]:
    """(rope theta, scaling dict) of the full-attention layers (transformers 4 and 5 spellings)."""
    rope = dict(hf.get("rope_scaling") or {})
    params = hf.get("rope_parameters") or {}
    rope.update(params.get("full_attention", params))
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    return float(theta), rope


def _head_dim(hf: dict) -> int:
    return hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def llama3_rope_factors(hf: dict) -> np.ndarray:
    """convert_hf_to_gguf's rope_freqs for rope_type llama3: divisor per frequency (1 fast, factor slow)."""
    theta, rope = _rope(hf)
    dim = _head_dim(hf)
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _rotary_dim(hf: dict, rope: dict) -> int:
    factor = hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    return int(_head_dim(hf) * factor)


def _add_metadata(w: gguf.GGUFWriter, hf: dict, arch: str, file_type, name: str) -> None:
    w.add_name(name)
    w.add_context_length(hf.get("max_position_embeddings", 2048))
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_block_count(hf["num_hidden_layers"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_head_count_kv(hf.get("num_key_value_heads") or hf["num_attention_heads"])
    w.add_key_length(_head_dim(hf))
    w.add_value_length(_head_dim(hf))
    theta, rope = _rope(hf)
    w.add_rope_dimension_count(_rotary_dim(hf, rope))
    w.add_rope_freq_base(theta)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind not in ("default", "llama3") and not (arch == "phi3" and kind in ("longrope", "su")):
        raise GGUFExportError(f"rope_type {kind!r} has no GGUF mapping here (default, linear, llama3, yarn; "
                              f"longrope for phi3)")
    w.add_layer_norm_rms_eps(hf.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(hf["vocab_size"])
    if arch in ("gemma2", "gemma3"):
        _gemma_metadata(w, hf, arch)
    if arch == "phi3":
        _phi3_metadata(w, hf, rope, kind)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _gemma_metadata(w: gguf.GGUFWriter, hf: dict, arch: str) -> None:
    """Gemma 2/3 as convert_hf_to_gguf writes them, refusing what llama.cpp's gemma graphs assume away:
    they interleave sliding/full layers at a fixed period (2 for Gemma 2, 6 for Gemma 3), scale queries by
    1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B sizes) and run Gemma 3's sliding layers at RoPE
    base 10000."""
    n, period = hf["num_hidden_layers"], 2 if arch == "gemma2" else 6
    want = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]
    if hf.get("layer_types") not in (None, want):
        raise GGUFExportError(f"{arch}: layer_types {hf['layer_types']} differ from llama.cpp's fixed pattern "
                              f"(every {period}th layer full attention)")
    scalar, head_dim = hf.get("query_pre_attn_scalar", 256), _head_dim(hf)
    big = (arch == "gemma2" and n == 46) or (arch == "gemma3" and n == 62)
    if scalar != (hf["hidden_size"] // hf["num_attention_heads"] if big else head_dim):
        raise GGUFExportError(f"{arch}: query_pre_attn_scalar {scalar} is not what llama.cpp assumes for this "
                              f"size ({'hidden/heads' if big else f'head_dim {head_dim}'})")
    if arch == "gemma2":
        w.add_attn_logit_softcapping(hf.get("attn_logit_softcapping") or 0.0)
    if hf.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(hf["final_logit_softcapping"])
    if hf.get("sliding_window"):
        w.add_sliding_window(hf["sliding_window"])
    local = (hf.get("rope_parameters") or {}).get("sliding_attention", {}).get(
        "rope_theta", hf.get("rope_local_base_freq", 10000.0))
    if arch == "gemma3" and local != 10000.0:
        raise GGUFExportError(f"gemma3: sliding-layer RoPE base {local} (llama.cpp uses 10000)")


def _phi3_metadata(w: gguf.GGUFWriter, hf: dict, rope: dict, kind: str) -> None:
    """Phi-3: original context, sliding window and (longrope) the attention factor."""
    orig = hf.get("original_max_position_embeddings", rope.get("original_max_position_embeddings",
                                                                  hf.get("max_position_embeddings", 4096)))
    w.add_rope_scaling_orig_ctx_len(orig)
    w.add_sliding_window(hf.get("sliding_window") or 0)
    scale = hf.get("max_position_embeddings", orig) / orig
    if kind in ("longrope", "su"):
        w.add_rope_scaling_attn_factors(max(math.sqrt(1 + math.log(scale) / math.log(orig)), 1.0))


def _extra_tensors(hf: dict, arch: str) -> list[tuple[str, np.ndarray]]:
    _, rope = _rope(hf)
    kind = rope.get("rope_type", rope.get("type"))
    if kind == "llama3":
        return [("rope_freqs.weight", llama3_rope_factors(hf))]
    if arch == "phi3" and kind in ("longrope", "su"):
        return [("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32)),
                ("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))]
    return []


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get more bits in the _M k-quant mixes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _matrix_type(gguf_type: str, name: str, n_layers: int, has_output: bool) -> gguf.GGMLQuantizationType:
    """The type of matrix ``name``; for q4_k_m llama-quant.cpp's rules: the head (``output``, or
    ``token_embd`` when the head is tied and there is no ``output``) Q6_K, attn_v / ffn_down Q6_K in the
    use_more_bits layers, the rest Q4_K."""
    _, matrix_type, edge_type = GGUF_TYPES[gguf_type]
    if gguf_type == "q4_k_m":
        parts = name.split(".")
        if name.startswith("output.") or (name.startswith("token_embd.") and not has_output):
            return Q.Q6_K
        if parts[0] == "blk" and parts[2] in ("attn_v", "ffn_down") and use_more_bits(int(parts[1]), n_layers):
            return Q.Q6_K
        return Q.Q4_K
    return edge_type if name.startswith(("token_embd.", "output.")) else matrix_type


def _plan(files: list[Path], hf: dict, arch: str, gguf_type: str) -> list[_Tensor]:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hf["num_hidden_layers"])
    headers = [(path, read_header(path)) for path in files]
    has_output = any(names.get_name(source, try_suffixes=(".weight",)) == "output.weight"
                     for _, header in headers for source in header)
    plan = []
    for path, header in headers:
        for source, entry in header.items():
            if source.endswith("rotary_emb.inv_freq"):
                continue
            name = names.get_name(source, try_suffixes=(".weight", ".bias"))
            if source == "lm_head.weight" and name is None and hf.get("tie_word_embeddings", True):
                continue  # Gemma: llama.cpp reads the tied head from token_embd
            if name is None:
                raise GGUFExportError(f"{path}: tensor {source!r} has no GGUF name for architecture {arch!r}")
            shape = tuple(entry["shape"])
            if len(shape) == 1:
                qtype = Q.F32
            else:
                qtype = _matrix_type(gguf_type, name, hf["num_hidden_layers"], has_output)
                if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                    qtype = K_FALLBACK.get(qtype, Q.F16)
                if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                    qtype = Q.F16
            plan.append(_Tensor(source, name, shape, qtype))
    return plan


def _nbytes(t: _Tensor) -> tuple[tuple, np.dtype, int]:
    """(shape given to add_tensor_info, its dtype, bytes) for tensor `t`."""
    if t.qtype in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if t.qtype == Q.F32 else np.float16)
        return t.shape, dtype, int(np.prod(t.shape)) * dtype.itemsize
    byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _convert(t: _Tensor, value: np.ndarray, hf: dict, fam: Family) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if fam.permute and ".self_attn.q_proj." in t.source:
        value = permute_rows(value, hf["num_attention_heads"])
    elif fam.permute and ".self_attn.k_proj." in t.source:
        value = permute_rows(value, hf.get("num_key_value_heads") or hf["num_attention_heads"])
    if fam.norm_shift and t.source.endswith("norm.weight"):
        value = value + np.float32(fam.norm_shift)
    if t.qtype == Q.Q4_K:
        return quantize_q4_k(value)
    if t.qtype == Q.Q6_K:
        return quantize_q6_k(value)
    return gguf.quants.quantize(value, t.qtype)


def export_gguf(model_dir, out, gguf_type: str = "f16", *, name: str | None = None) -> Path:
    """Writes ``out`` (a .gguf file) from the transformers checkpoint ``model_dir``; returns its path.

    The file is written to a temporary sibling and renamed into place (a failure leaves ``out`` as it
    was). See the module docstring for names, layouts, types and metadata.

    Raises:
      GGUFExportError: an unknown type (listing the supported ones), a model_type with no GGUF mapping,
        a tensor with no GGUF name, a RoPE scaling GGUF cannot express, or tokenizer trouble.
    """
    gguf_type = check_type(gguf_type)
    model_dir, out = Path(model_dir), Path(out)
    hf = read_config(model_dir)
    fam = family(hf, model_dir / "config.json")
    arch = fam.arch
    files = weight_files(model_dir, allow_pickle=False)
    plan = _plan(files, hf, arch, gguf_type)
    extra = _extra_tensors(hf, arch)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        try:
            _add_metadata(w, hf, arch, GGUF_TYPES[gguf_type][0], name or model_dir.resolve().name)
        except GGUFExportError as e:
            raise GGUFExportError(f"{model_dir / 'config.json'}: {e}") from None
        try:
            add_vocab(w, model_dir, hf["vocab_size"])
        except ValueError as e:
            raise GGUFExportError(str(e)) from None
        for t in plan:
            shape, dtype, nbytes = _nbytes(t)
            w.add_tensor_info(t.name, shape, dtype, nbytes, raw_dtype=None if dtype != np.uint8 else t.qtype)
        for tensor_name, value in extra:
            w.add_tensor_info(tensor_name, value.shape, value.dtype, value.nbytes)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        by_source = {t.source: t for t in plan}
        for path in files:
            for source, value in iter_tensors(path):
                if source in by_source:
                    w.write_tensor_data(_convert(by_source[source], value, hf, fam))
        for _, value in extra:
            w.write_tensor_data(value)
        w.close()
        os.chmod(tmp, new_file_mode(out))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def read_chat_template(model_dir) -> str | None:
    """The chat template a checkpoint dir carries (tokenizer_config.json, chat_template.jinja/.json)."""
    return gguf.SpecialVocab(Path(model_dir), load_merges=False).chat_template
