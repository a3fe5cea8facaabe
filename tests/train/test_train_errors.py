"""Bad training input: errors name the file and line, and nothing the user wrote is lost."""
import json

from jlora.cli import main


def test_malformed_jsonl_line_is_named(default_base, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello there"}\n{"text": "oops"\n')
    code = main(["train", "--model", str(default_base), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--no-progress"])
    assert code == 2
    assert f"{data}:2" in capsys.readouterr().err


def test_model_without_data_is_refused(default_base, tmp_path, capsys):
    assert main(["train", "--model", str(default_base), "--out", str(tmp_path / "r")]) == 2
    assert "--data is required" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["train", "--out", str(out), "--steps", "6", "--save-every", "1", "--lr", "1e30",
                 "--warmup-steps", "0", "--max-grad-norm", "0", "--eval-every", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "training stopped" in err and "last good checkpoint is step" in err
    steps = [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and all(json.loads(x)["loss"] == json.loads(x)["loss"]
                         for x in (out / "metrics.jsonl").read_text().splitlines())


def test_overwrite_replaces_an_earlier_run(tmp_path):
    out = tmp_path / "r"
    args = ["train", "--out", str(out), "--steps", "2", "--batch-size", "2", "--seq-len", "48", "--eval-every", "0",
            "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2
    assert main(args + ["--overwrite"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_tokenizer_larger_than_model_vocab_is_refused(checkpoint, default_base, tmp_path, capsys):
    import shutil
    model = tmp_path / "m"
    shutil.copytree(checkpoint("llama"), model)  # vocab 96
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_base / f, model / f)  # 512 tokens
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello there"}\n')
    assert main(["train", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    assert "vocab" in capsys.readouterr().err
