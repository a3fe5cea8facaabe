"""`jlora train`'s long-context flags: --remat POLICY|auto (bare --remat: full), --attention, --loss-chunk-tokens,
--loraplus-lr-ratio; checked up front naming the flag, applied to the model, compared on --resume; and the
warning when --seq-len passes max_position_embeddings, naming the rope scaling in force."""
import argparse
import json

import pytest
from flax import nnx

from jlora.commands.train_settings import add_train_flags, settings_from_args
from jlora.llama import init_random
from jlora.llama_config import LlamaConfig
from jlora.train import long_context, run_dir
from jlora.train.config import LOSS_CHUNK_TOKENS, ConfigError, TrainConfig
from jlora.train.chunked_loss import DEFAULT_CHUNK_TOKENS

TINY = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, max_position_embeddings=128)


def _settings(*argv):
    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    return settings_from_args(parser.parse_args(list(argv)), demo=False)[0]


def test_flags_parse_and_default():
    c = _settings()
    assert (c.remat, c.attention, c.loss_chunk_tokens, c.loraplus_lr_ratio) == ("none", "auto", 2048, None)
    assert LOSS_CHUNK_TOKENS == DEFAULT_CHUNK_TOKENS  # config.py states the default without importing jax
    assert _settings("--remat").remat == "full"  # the flag's old meaning
    c = _settings("--remat", "offload", "--attention", "blockwise", "--loss-chunk-tokens", "0",
                  "--loraplus-lr-ratio", "16")
    assert (c.remat, c.attention, c.loss_chunk_tokens, c.loraplus_lr_ratio) == ("offload", "blockwise", 0, 16.0)
    assert TrainConfig(remat=True).remat == "full" and TrainConfig(remat=False).remat == "none"  # old YAML / JSON


@pytest.mark.parametrize("argv, message", [
    (("--remat", "host"), "--remat 'host': expected one of none, dots, full, offload, auto"),
    (("--attention", "xla"), "--attention 'xla': expected one of auto, blockwise, reference, splash, cudnn, flash"),
    (("--loss-chunk-tokens", "-1"), "--loss-chunk-tokens -1: expected an integer >= 0 (0: the whole logits"),
    (("--loraplus-lr-ratio", "0"), "--loraplus-lr-ratio 0.0: expected a number > 0"),
])
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _settings(*argv)


def test_backend_unavailable_here_names_the_flag_and_the_available_ones():
    with pytest.raises(ConfigError, match=r"--attention cudnn: attention backend 'cudnn' is not available on cpu "
                                          r"\(needs a CUDA GPU\); available here: auto, blockwise, reference"):
        long_context.check_platform(TrainConfig(attention="cudnn"))


def test_configure_model_sets_backend_and_policy():
    model = init_random(LlamaConfig.from_hf_dict(TINY))
    logs = []
    policy = long_context.configure_model(model, TrainConfig(attention="blockwise", remat="auto", seq_len=64),
                                          log=logs.append)
    assert policy == "none" and model.remat == "none"
    assert logs == ["--remat auto: none on CPU (XLA:CPU holds the same memory under every remat policy)"]
    backends = {m.attention for _, m in nnx.iter_graph(model) if hasattr(m, "attention_blocks")}
    assert backends == {"blockwise"}
    long_context.configure_model(model, TrainConfig(remat="dots", seq_len=64), log=logs.append)
    assert model.remat == "dots" and len(logs) == 1
    assert long_context.remat_policy("auto", platform="tpu")[0] == "full"


def test_seq_len_past_max_position_embeddings_warns_with_the_rope_scaling():
    plain = LlamaConfig.from_hf_dict(TINY)
    assert long_context.seq_len_warning(plain, 128) is None
    warning = long_context.seq_len_warning(plain, 129)
    assert "--seq-len 129 exceeds the model's max_position_embeddings 128; rope scaling in force: none" in warning
    scaled = LlamaConfig.from_hf_dict({**TINY, "rope_scaling": dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)})
    assert ("rope scaling in force: llama3 (factor=8.0, high_freq_factor=4.0, low_freq_factor=1.0, "
            "original_max_position_embeddings=16)") in long_context.seq_len_warning(scaled, 4096)
    logs = []
    long_context.configure_model(init_random(scaled), TrainConfig(seq_len=4096), log=logs.append)
    assert any(line.startswith("warning: --seq-len 4,096 exceeds") for line in logs), logs


def test_resume_compares_the_new_settings(tmp_path):
    saved = TrainConfig(out=str(tmp_path)).to_dict()
    saved["remat"] = True  # a run_config.json from before the policies
    (tmp_path / "run_config.json").write_text(json.dumps(saved))
    logs = []
    run_dir.check(TrainConfig(out=str(tmp_path), resume=True, remat="full"), log=logs.append)
    assert logs == []  # true is "full"
    run_dir.check(TrainConfig(out=str(tmp_path), resume=True, remat="offload", attention="reference",
                              loss_chunk_tokens=0), log=logs.append)
    assert len(logs) == 1 and "--remat offload (the run has full); --attention reference (the run has auto); " \
                                "--loss-chunk-tokens 0 (the run has 2048)" in logs[0], logs
    with pytest.raises(run_dir.RunDirError, match=r"--loraplus-lr-ratio 16 \(the run has None\)"):
        run_dir.check(TrainConfig(out=str(tmp_path), resume=True, loraplus_lr_ratio=16), log=logs.append)


def test_auto_remat_on_an_accelerator_takes_the_first_policy_the_estimate_fits():
    """jlora train --remat auto on TPU/GPU (jlora.plan.auto_remat): with a device too small for every saved
    activation but big enough for the projections' outputs, dots; for the layer inputs only, full; smaller
    than anything, offload (the last)."""
    from jlora.plan.auto_remat import lightest_fitting_remat
    model_config = LlamaConfig.from_hf_dict(TINY)
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    config = TrainConfig(batch_size=4, seq_len=128, remat="auto", attention="blockwise", dtype="bfloat16")
    policy, est = lightest_fitting_remat(config, model_config, device_bytes=1, mesh_sizes=sizes)
    assert policy == "offload" and list(est) == ["none", "dots", "full", "offload"]
    assert est["none"] > est["dots"] > est["full"] > est["offload"], est
    between = (est["none"] + est["dots"]) / 2 / 0.9
    policy, est2 = lightest_fitting_remat(config, model_config, device_bytes=int(between), mesh_sizes=sizes)
    assert policy == "dots" and list(est2) == ["none", "dots"], est2
    between = (est["dots"] + est["full"]) / 2 / 0.9
    policy, est2 = lightest_fitting_remat(config, model_config, device_bytes=int(between), mesh_sizes=sizes)
    assert policy == "full" and list(est2) == ["none", "dots", "full"], est2


def test_the_step_is_traced_under_the_mesh_only_for_splash_on_several_devices(monkeypatch):
    """Splash on a mesh must be traced under jax.set_mesh (else XLA replicates the Mosaic call on every chip)."""
    import contextlib
    import types

    import jax

    from jlora.train import long_context

    entered = []
    monkeypatch.setattr(jax, "set_mesh", lambda mesh: entered.append(mesh) or contextlib.nullcontext())
    several, one = types.SimpleNamespace(size=4), types.SimpleNamespace(size=1)
    for attention, mesh in (("splash", several), ("auto", several), ("blockwise", several), ("splash", one),
                            ("splash", None)):
        with long_context.tracing_context(types.SimpleNamespace(attention=attention), mesh):
            pass
    assert entered == [several]  # auto is splash only on TPU; blockwise is XLA's to partition; one device: nothing
