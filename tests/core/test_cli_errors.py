"""Broken model directories given to the CLI: one line on stderr naming the file, a non-zero exit, no traceback."""
import json
import shutil
import struct
import time

import pytest

from jlora.cli import main


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q: {i} plus 1?\nA:", "completion": f" {i + 1}"}) + "\n"
                            for i in range(8)))
    return path


@pytest.fixture
def model(default_base, tmp_path):
    """A writable copy of the default base (tiny Llama, tokenizer, one model.safetensors)."""
    return shutil.copytree(default_base, tmp_path / "model")


def _train(model, data, tmp_path, capsys, *extra):
    code = main(["train", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line(err):
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_malformed_config_json(model, data, tmp_path, capsys):
    (model / "config.json").write_text('{"model_type": "llama",')
    code, err = _train(model, data, tmp_path, capsys)
    assert code == 2
    assert f"{model / 'config.json'}: not valid JSON" in _one_line(err)


def test_config_json_that_is_not_an_object(model, data, tmp_path, capsys):
    (model / "config.json").write_text("[1, 2]")
    code, err = _train(model, data, tmp_path, capsys)
    assert code == 2
    assert f"{model / 'config.json'}: expected a JSON object" in _one_line(err)


def test_model_that_is_a_file(tmp_path, data, capsys):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x" * 16)
    code, err = _train(path, data, tmp_path, capsys)
    assert code == 2
    assert f"{path}: not a directory (is a file)" in _one_line(err)


def test_model_without_tokenizer_is_named_before_transformers_tries(model, data, tmp_path, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink()
    code, err = _train(model, data, tmp_path, capsys)
    line = _one_line(err)
    assert code == 2
    assert f"{model}: no tokenizer (expected one of tokenizer.json" in line
    assert "sentencepiece" not in err.lower()


def _write_raw_safetensors(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("header", [
    b"{not json",
    b"[1, 2, 3]",
    json.dumps({"model.embed_tokens.weight": 5}).encode(),
    json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}).encode(),
    json.dumps({"model.embed_tokens.weight": {"dtype": "XYZ", "shape": [2], "data_offsets": [0, 8]}}).encode(),
    json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(),
])
def test_corrupt_safetensors_header_names_the_file(model, data, tmp_path, capsys, header):
    path = model / "model.safetensors"
    _write_raw_safetensors(path, header, b"\0" * 8)
    code, err = _train(model, data, tmp_path, capsys)
    line = _one_line(err)
    assert code == 2
    assert f"{path}: " in line and "safetensors" in line


def _shard(model):
    """Turns the single-file checkpoint into a one-shard checkpoint with an index; returns the index path."""
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    return model / "model.safetensors.index.json"


@pytest.mark.parametrize("index, found", [
    ("{oops", "not valid JSON"),
    ('{"metadata": {}}', 'expected a JSON object with a non-empty "weight_map"'),
    ('{"weight_map": []}', 'expected a JSON object with a non-empty "weight_map"'),
    ('{"weight_map": {"lm_head.weight": 3}}', "weight_map values must be shard file names"),
    ('{"weight_map": {"lm_head.weight": "../x.safetensors"}}', "outside the model directory"),
    ('{"weight_map": {"lm_head.weight": "/etc/x.safetensors"}}', "outside the model directory"),
])
def test_bad_sharded_index(model, data, tmp_path, capsys, index, found):
    path = _shard(model)
    path.write_text(index)
    code, err = _train(model, data, tmp_path, capsys)
    line = _one_line(err)
    assert code == 2
    assert line.startswith(f"jlora train: error: {path}: ") and found in line


def test_hub_id_offline_is_one_line_and_fast(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    code, err = _train("meta-llama/Llama-3.2-1B", data, tmp_path, capsys)
    elapsed = time.perf_counter() - start
    line = _one_line(err)
    assert code == 2
    assert "'meta-llama/Llama-3.2-1B'" in line and "could not be fetched" in line and "HF_HUB_OFFLINE" in line
    assert "local checkpoint directory" in line
    assert elapsed < 40, elapsed  # 77 s of retries before; ~5 s here under load, mostly imports


def test_unexpected_exception_is_one_line_unless_debug(monkeypatch, capsys):
    from jlora import cli

    class Args:
        command = "plan"

        @staticmethod
        def func(args):
            raise KeyError("surprise")

    monkeypatch.setattr(cli.argparse.ArgumentParser, "parse_args", lambda self, argv=None: Args())
    assert main(["plan"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "internal error: KeyError" in line and "--debug" in line
    with pytest.raises(KeyError):
        main(["plan", "--debug"])


def test_inspect_adapter_with_nan_weights(checkpoint, tmp_path, capsys):
    from flax import nnx

    import jlora
    from jlora.convert.safetensors_io import iter_tensors, write_atomic

    model = jlora.get_peft_model(jlora.load_hf(checkpoint("llama")), jlora.LoraConfig(r=4), rngs=nnx.Rngs(0))
    jlora.save_pretrained(model, tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    tensors = dict(iter_tensors(f))
    name = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0] = float("nan")
    write_atomic(f, tensors, metadata={"format": "pt"})
    capsys.readouterr()
    code = main(["inspect", str(tmp_path / "a"), "--out", str(tmp_path)])
    line = _one_line(capsys.readouterr().err)
    assert code == 2
    assert str(tmp_path / "a") in line and "model.layers.1.mlp.up_proj.lora_B" in line and "NaN" in line


@pytest.mark.parametrize("field, value", [("hidden_size", "32"), ("num_attention_heads", 0), ("vocab_size", -1),
                                          ("num_hidden_layers", 2.5), ("rms_norm_eps", "x")])
def test_config_json_with_a_wrong_value_names_the_field(model, data, tmp_path, capsys, field, value):
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, field: value}))
    code, err = _train(model, data, tmp_path, capsys)
    assert code == 2
    assert f"{model / 'config.json'}: {field} must be a " in _one_line(err) and repr(value) in err
