"""GGUF export of a merged model: transformers' GGUF loader (its own reader, dequantizers and llama.cpp
un-permutation) and gguf's GGUFReader are the references."""
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

gguf = pytest.importorskip("gguf")

import jlora  # noqa: E402
from jlora.convert.gguf_export import GGUFExportError, export_gguf, llama3_rope_factors  # noqa: E402
from jlora.convert.safetensors_io import iter_tensors  # noqa: E402


def _ids():
    return np.random.RandomState(0).randint(0, 500, (2, 17))


@pytest.fixture(scope="module")
def merged(default_base, tmp_path_factory):
    """(merged dir in float16, jlora's float32 logits of that merged checkpoint, its float32 merged logits)."""
    model = jlora.get_peft_model(jlora.load_hf(default_base),
                                 jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), rngs=nnx.Rngs(1))
    full = np.asarray(model(_ids()))
    out = tmp_path_factory.mktemp("merged")
    jlora.save_merged(model, out, dtype="float16")
    return out, np.asarray(jlora.load_hf(out, dtype="float32")(_ids())), full


def _hf_logits(path):
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(torch.tensor(_ids())).logits.numpy()


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_f16_loads_in_transformers_with_jlora_logits(merged, tmp_path, rel):
    src, ours, full = merged
    path = export_gguf(src, tmp_path / "model.gguf", "f16")
    got = _hf_logits(path)
    assert rel(got, ours) <= 1e-3, f"f16 GGUF vs jlora's float16 merged model: {rel(got, ours):.3g}"
    assert rel(got, full) <= 1e-2, "and close to the float32 merged model (f16 weight rounding only)"


def test_q_k_rows_are_permuted_as_llama_cpp(merged, tmp_path):
    """llama.cpp's LlamaModel.permute, written out here: rows of each head go [r0, r(d/2), r1, r(d/2+1) ...]."""
    src, _, _ = merged
    path = export_gguf(src, tmp_path / "model.gguf", "f16")
    written = _tensors(path)
    hf = dict(iter_tensors(src / "model.safetensors"))
    for proj, heads in (("q", 4), ("k", 2)):
        w = hf[f"model.layers.1.self_attn.{proj}_proj.weight"]
        d = w.shape[0] // heads
        order = np.concatenate([h * d + np.stack([np.arange(d // 2), d // 2 + np.arange(d // 2)], 1).ravel()
                                for h in range(heads)])
        np.testing.assert_array_equal(np.asarray(written[f"blk.1.attn_{proj}.weight"].data), w[order])
    np.testing.assert_array_equal(np.asarray(written["blk.1.attn_v.weight"].data),
                                  hf["model.layers.1.self_attn.v_proj.weight"])


# (type, matrix type, steps per absmax, error bound in steps): Q8_0 rounds to nearest of +-127 steps;
# Q4_0 has codes -8..7 of absmax/8, so the value at the clipped end is one full step away.
@pytest.mark.parametrize("kind,qtype,step,slack", [("q8_0", "Q8_0", 127, 0.5), ("q4_0", "Q4_0", 8, 1.0)])
def test_quantized_tensors(merged, tmp_path, rel, kind, qtype, step, slack):
    """Quantized matrices: gguf's dequantization of the bytes written equals transformers' own GGUF
    dequantization, and lies within the quantization step (absmax / step per block of 32) of the source
    weight; logits stay near the float32 merged model."""
    src, _, full = merged
    path = export_gguf(src, tmp_path / "model.gguf", kind)
    hf = dict(iter_tensors(src / "model.safetensors"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf",
                                                            dtype=torch.float32).eval()
    hf_state = ref.state_dict()
    for t in gguf.GGUFReader(path).tensors:
        if t.name != "blk.0.attn_v.weight" and not t.name.startswith(("blk.2.ffn_down", "token_embd")):
            continue
        want_type = "Q8_0" if t.name.startswith("token_embd") else qtype
        assert t.tensor_type.name == want_type, t.name
        deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        source = {"blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
                  "blk.2.ffn_down.weight": "model.layers.2.mlp.down_proj.weight",
                  "token_embd.weight": "model.embed_tokens.weight"}[t.name]
        np.testing.assert_array_equal(deq, hf_state[source].numpy(), err_msg=f"{t.name}: transformers' dequant")
        w = hf[source].astype(np.float32)
        blocks = np.abs(w.reshape(-1, 32)).max(1, keepdims=True)
        s, k = (127, 0.5) if want_type == "Q8_0" else (step, slack)
        err = np.abs(deq - w).reshape(-1, 32)
        # plus the f16 rounding of the block scale (2^-11 relative, times the largest code)
        assert (err <= blocks / s * (k + 2 ** -10 * s) + 1e-7).all(), t.name
        assert (err.max(1) > blocks[:, 0] / s * k / 4).any(), "the bound must be near the error, not loose"
    got = _hf_logits(path)
    bound = {"q8_0": 0.1, "q4_0": 1.0}[kind]  # measured 0.06 and 0.54 on this random 4-layer model
    assert rel(got, full) <= bound, f"{kind}: logits rel {rel(got, full):.3g}"


@pytest.fixture(scope="module")
def wide_checkpoint(default_base, tmp_path_factory):
    """A random 2-layer Llama with rows of 256 (k-quant blocks) and the default base's tokenizer."""
    import shutil
    out = tmp_path_factory.mktemp("wide")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_base / f, out / f)
    return out


def test_q4_k_m_mix_and_kquant_bytes(wide_checkpoint, tmp_path, rel):
    """q4_k_m: llama-quantize's type per tensor; the Q4_K / Q6_K bytes dequantize (gguf and transformers
    agree exactly) to within about one code step of the weights; transformers runs the file."""
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize
    path = export_gguf(wide_checkpoint, tmp_path / "model.gguf", "q4_k_m")
    hf = dict(iter_tensors(wide_checkpoint / "model.safetensors"))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    # use_more_bits(i, 2): layer 1 only; output in Q6_K; norms float32
    assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_down.weight"] == "Q4_K"
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["blk.1.attn_q.weight"] == "Q4_K" and types["blk.1.attn_norm.weight"] == "F32"
    tied = dict(_plan_types(wide_checkpoint, tmp_path))
    assert "output.weight" not in tied and tied["token_embd.weight"] == "Q6_K", "a tied head: token_embd is the head"
    assert gguf.GGUFReader(path).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    for t in gguf.GGUFReader(path).tensors:
        if t.name not in ("blk.0.ffn_down.weight", "blk.1.ffn_down.weight"):
            continue
        raw = np.asarray(t.data)
        deq = gguf.quants.dequantize(raw, t.tensor_type)
        ours_hf = hf_dequantize(torch.from_numpy(raw.copy()), int(t.tensor_type)).numpy().reshape(deq.shape)
        np.testing.assert_array_equal(deq, ours_hf, err_msg=t.name)
        w = hf[f"model.layers.{t.name.split('.')[1]}.mlp.down_proj.weight"]
        sub = 32 if t.tensor_type.name == "Q4_K" else 16
        blocks = w.reshape(-1, sub)
        # a code step: Q4_K 16 levels over [min(x, 0), max x]; Q6_K 64 levels over [-max|x|, max|x|]
        step = ((blocks.max(1) - np.minimum(blocks.min(1), 0)) / 15 if sub == 32
                else 2 * np.abs(blocks).max(1) / 63)
        err = (deq - w).reshape(-1, sub)
        # the least-squares scales may clip an extreme value (measured up to 1.01 steps on random data); the
        # rms is that of rounding (uniform: 0.29 step; measured 0.26). A layout slip errs by many steps.
        assert (np.abs(err).max(1) <= 1.25 * step + 1e-7).all(), t.name
        assert np.mean(np.sqrt((err ** 2).mean(1)) / step) <= 0.3, t.name
    ref = transformers.AutoModelForCausalLM.from_pretrained(wide_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor(_ids())).logits.numpy()
    got = _hf_logits(path)
    # 4-bit weights of a random model: measured 0.25 (the tensor checks above are the exact ones)
    assert rel(got, want) <= 0.4, f"q4_k_m logits rel {rel(got, want):.3g}"


FAMILIES = {
    "qwen2": ("Qwen2Config", {}),
    # transformers' GGUF loader ignores qwen3's key_length and assumes head_dim 128
    "qwen3": ("Qwen3Config", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    # transformers' GGUF loader keeps Gemma's default query_pre_attn_scalar (256) and softcaps: head_dim 256
    "gemma2": ("Gemma2Config", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=8)),
    "gemma3": ("Gemma3TextConfig", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                        sliding_window=8, num_hidden_layers=6)),
    "phi3": ("Phi3Config", dict(pad_token_id=0, eos_token_id=2, bos_token_id=1)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_families_load_in_transformers(family, default_base, tmp_path, rel):
    """f32 export of each mapped family (biases, q/k norms, tied head): transformers' GGUF loader rebuilds
    the same model."""
    import shutil
    cls, extra = FAMILIES[family]
    config = getattr(transformers, cls)(**{**dict(vocab_size=512, hidden_size=64, intermediate_size=96,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=128), **extra})
    torch.manual_seed(1)
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    ref.save_pretrained(tmp_path / "hf")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_base / f, tmp_path / "hf" / f)
    path = export_gguf(tmp_path / "hf", tmp_path / "model.gguf", "f32")
    with torch.no_grad():
        want = ref(torch.tensor(_ids())).logits.numpy()
    assert rel(_hf_logits(path), want) <= 1e-5, family


def _plan_types(src, tmp_path):
    """(name, type) of the q4_k_m export of ``src`` with its head tied (lm_head dropped, tie_word_embeddings)."""
    import json
    import shutil
    tied = tmp_path / "tied"
    shutil.copytree(src, tied)
    hf = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": True}))
    tensors = {k: v for k, v in iter_tensors(tied / "model.safetensors") if k != "lm_head.weight"}
    from safetensors.numpy import save_file
    save_file(tensors, str(tied / "model.safetensors"))
    path = export_gguf(tied, tmp_path / "tied.gguf", "q4_k_m")
    return [(t.name, t.tensor_type.name) for t in gguf.GGUFReader(path).tensors]


def test_metadata_read_back(merged, tmp_path):
    src, _, _ = merged
    path = export_gguf(src, tmp_path / "model.gguf", "bf16")
    fields = gguf.GGUFReader(path).fields

    def value(key):
        return fields[key].contents()

    base = transformers.AutoConfig.from_pretrained(src)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    assert value("general.architecture") == "llama"
    assert value("llama.context_length") == base.max_position_embeddings
    assert value("llama.embedding_length") == base.hidden_size
    assert value("llama.block_count") == base.num_hidden_layers
    assert value("llama.attention.head_count") == base.num_attention_heads
    assert value("llama.attention.head_count_kv") == base.num_key_value_heads
    assert value("llama.rope.freq_base") == pytest.approx(base.rope_parameters["rope_theta"])
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(base.rms_norm_eps)
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_BF16
    assert value("tokenizer.ggml.model") == "gpt2"
    tokens = value("tokenizer.ggml.tokens")
    assert tokens == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert value("tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert value("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert value("tokenizer.chat_template") == tok.chat_template
    # the tokenizer transformers rebuilds from the GGUF metadata tokenizes like the original
    again = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    text = "Q: what is 12 + 7?\nA: 19"
    assert again(text)["input_ids"] == tok(text)["input_ids"]


def test_linear_rope_scaling_metadata(checkpoint, default_base, tmp_path):
    """Linear RoPE scaling is metadata (transformers' GGUF loader does not read it: checked with GGUFReader)."""
    import json
    import shutil
    src = tmp_path / "hf"
    shutil.copytree(checkpoint("llama-linear"), src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_base / f, src / f)
    with pytest.raises(GGUFExportError, match="the tokenizer has ids up to 511 but config.json's vocab_size is 96"):
        export_gguf(src, tmp_path / "m.gguf", "f16")
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**hf, "vocab_size": 512}))  # metadata only: shapes unchecked
    fields = gguf.GGUFReader(export_gguf(src, tmp_path / "m.gguf", "f16")).fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == 2.0


def test_llama3_rope_factors_match_transformers():
    """rope_freqs (llama.cpp divides each frequency by its factor) equals transformers' llama3 inv_freq ratio."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=64, rope_theta=500000.0)
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=rope,
                                   max_position_embeddings=1024)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    ours = llama3_rope_factors(cfg.to_dict())
    assert len(set(np.round(ours, 3))) > 3, "fast, slow and smoothed frequencies all present"
    np.testing.assert_allclose(ours, (plain / scaled).numpy(), rtol=1e-5)


def test_bad_type_and_family(merged, tmp_path, checkpoint):
    src, _, _ = merged
    with pytest.raises(GGUFExportError, match=r"unknown GGUF type 'q5_k_m'; supported: f32, f16, bf16, q8_0, "
                                              r"q4_0, q4_k_m .*llama-quantize"):
        export_gguf(src, tmp_path / "m.gguf", "q5_k_m")
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text('{"model_type": "smollm3"}')
    with pytest.raises(GGUFExportError, match="model_type 'smollm3' has no GGUF mapping"):
        export_gguf(gemma, tmp_path / "m.gguf", "f16")
    with pytest.raises(GGUFExportError, match="no tokenizer.json or tokenizer.model"):
        export_gguf(checkpoint("llama"), tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*")), "nothing left behind"


def test_cli_adapter_to_gguf_and_modelfile(default_base, tmp_path, rel, capsys):
    """`jlora export ADAPTER --out m.gguf --gguf q8_0 --ollama`: merged with its base, loadable, a Modelfile."""
    from jlora.cli import main
    model = jlora.get_peft_model(jlora.load_hf(default_base),
                                 jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), rngs=nnx.Rngs(2))
    jlora.save_pretrained(model, tmp_path / "adapter", base_model_name_or_path=str(default_base))
    want = np.asarray(model(_ids()))
    out = tmp_path / "gguf" / "m.gguf"  # its directory is created
    assert main(["export", str(tmp_path / "adapter"), "--out", str(out), "--gguf", "q8_0", "--ollama"]) == 0
    assert rel(_hf_logits(out), want) <= 0.1
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "</s>"' in modelfile
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "m.gguf"], "no temporary left"
    assert main(["export", str(tmp_path / "adapter"), "--out", str(out), "--gguf", "q5_k_m"]) == 2
    assert "supported: f32, f16, bf16, q8_0, q4_0, q4_k_m" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "x"), "--ollama"]) == 2


def _render_go(template: str, messages) -> str:
    """The Go text/template subset the Modelfile templates use: range .Messages, if eq .Role "x", else, end,
    .Role, .Content, and the {{- trim marker (tokens are not nested beyond if-inside-range)."""
    import re
    tokens = re.split(r"({{-?\s*.*?\s*}})", template)
    out = []

    def run(i, msg, emit):
        while i < len(tokens):
            tok = tokens[i]
            action = re.fullmatch(r"{{-?\s*(.*?)\s*}}", tok)
            if action is None:
                if emit:
                    out.append(tok)
                i += 1
                continue
            if tok.startswith("{{-") and emit and out:
                out[-1] = out[-1].rstrip()
            a = action.group(1)
            if a == "range .Messages":
                start = i + 1
                for m in messages:
                    i = run(start, m, emit)
                if not messages:
                    i = run(start, None, False)
            elif a.startswith("if eq .Role"):
                cond = msg is not None and msg["role"] == a.split('"')[1]
                i = run(i + 1, msg, emit and cond)
                if tokens[i].strip("{}- ") == "else":
                    i = run(i + 1, msg, emit and not cond)
            elif a in ("end", "else"):
                return i if a == "else" else i + 1
            else:
                if emit:
                    out.append(msg["role"] if a == ".Role" else msg["content"])
            i += 1 if a in (".Role", ".Content") else 0
        return i
    run(0, None, True)
    return "".join(out)


LLAMA3_JINJA = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_JINJA = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")


def test_modelfile_templates_render_like_the_jinja_ones(default_base):
    """The Go template of each known family renders a conversation as its Jinja template does (the published
    templates in tests/data/templates; bos aside: llama.cpp adds BOS itself)."""
    import pathlib

    import jinja2

    from jlora.convert.ollama import go_template, modelfile_text
    tok = transformers.AutoTokenizer.from_pretrained(default_base)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2+2?"}]
    system = [{"role": "system", "content": "be brief"}] + chat
    published = pathlib.Path(__file__).parents[1] / "data" / "templates"

    def jinja(source, **kw):
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
        return lambda m: env.from_string(source).render(messages=m, add_generation_prompt=True, bos_token="<bos>",
                                                        eos_token="<eos>", **kw).removeprefix("<bos>")

    cases = [("jlora-demo", tok.chat_template, system,
              lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
              .removeprefix(tok.bos_token)),
             ("llama3", LLAMA3_JINJA, system, jinja(LLAMA3_JINJA)),
             ("chatml", CHATML_JINJA, system, jinja(CHATML_JINJA))]
    for name, conversation in (("qwen2_5", system), ("qwen3", system), ("phi3", system), ("phi4", system),
                               ("gemma2", chat), ("gemma3", chat)):
        source = (published / f"{name}.jinja").read_text()
        cases.append((name, source, conversation, jinja(source, enable_thinking=True)))
    families = set()
    for what, source, conversation, render in cases:
        family, go, stops = go_template(source)
        assert family is not None, what
        families.add(family)
        assert _render_go(go, conversation) == render(conversation), what
    assert families == {"jlora-demo", "llama3", "chatml", "phi4", "phi3", "gemma"}
    assert "No TEMPLATE" in modelfile_text("m.gguf", "{{ messages }}")


def test_sentencepiece_style_bpe_vocab(tmp_path):
    """A byte-fallback BPE tokenizer.json (Llama 2 / Mistral / Gemma style) goes through gguf's LlamaHfVocab
    as tokenizer model "llama" with BYTE tokens; the tokenizer transformers rebuilds from it tokenizes alike."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    from jlora.default import dataset_paths
    texts = [json.loads(line)["prompt"] + json.loads(line)["completion"]
             for line in open(dataset_paths()[0], encoding="utf-8")]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    config = transformers.LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    fast.save_pretrained(tmp_path / "hf")
    path = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f16")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[3:259] == [gguf.TokenType.BYTE] * 256 and types[1] == gguf.TokenType.CONTROL
    again = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "Q: what is 12 + 7?\nA: 19 é"
    assert again(text, add_special_tokens=False)["input_ids"] == fast(text, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_qlora_nf4_merged_to_gguf(default_base, tmp_path, rel):
    """A QLoRA model (NF4 base + LoRA): merged (NF4 dequantized as bitsandbytes does) and written as f32 GGUF,
    transformers gives jlora's NF4 logits (measured 3.4e-6)."""
    model = jlora.get_peft_model(jlora.load_hf(default_base, quantize="nf4"),
                                 jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), rngs=nnx.Rngs(1))
    want = np.asarray(model(_ids()))
    jlora.save_merged(model, tmp_path / "merged", dtype="float32")
    path = export_gguf(tmp_path / "merged", tmp_path / "m.gguf", "f32")
    assert rel(_hf_logits(path), want) <= 1e-5
