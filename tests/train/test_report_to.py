"""`--report-to tensorboard,wandb`: the event files and the W&B run hold exactly metrics.jsonl's records (same
keys, same steps, eval metrics included), also after a resume (no step twice); a missing package or an unknown
reporter is one line before training starts.

Read back with independent readers: TensorBoard's own EventAccumulator (the `tensorboard` package, not the
tensorboardX writer jlora uses), and W&B's offline `.wandb` file parsed with wandb's own protobuf schema
(`wandb_internal_pb2.Record`; wandb >= 0.19 ships no Python reader for the file, whose framing is LevelDB's
log format: 32 KiB blocks of records with a 7-byte header, after a 7-byte ":W&B" file header).
"""
import importlib.util
import json
import math
import struct

import numpy as np
import pytest

from jlora.cli import main
from jlora.train import reporters
from jlora.train.config import ConfigError, TrainConfig
from jlora.train.metrics import MetricsLog

HAVE_TB_READER = importlib.util.find_spec("tensorboard") is not None and importlib.util.find_spec("tensorboardX")
HAVE_WANDB = importlib.util.find_spec("wandb") is not None
needs_tb = pytest.mark.skipif(not HAVE_TB_READER, reason="needs tensorboardX (writer) and tensorboard (the reader): "
                                                         "pip install 'jlora[test]'")
needs_wandb = pytest.mark.skipif(not HAVE_WANDB, reason="needs wandb: pip install 'jlora[wandb]'")


def tensorboard_history(logdir) -> dict[int, dict[str, float]]:
    """{step: {tag: value}} from every event file in `logdir`, read by TensorBoard; a step logged twice fails."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for ev in acc.Scalars(tag):
            assert tag not in out.setdefault(ev.step, {}), f"step {ev.step} of {tag} written twice"
            out[ev.step][tag] = ev.value
    return out


def wandb_records(path):
    """The protobuf records of an offline `.wandb` file (LevelDB log framing, wandb's Record schema)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, buf, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def wandb_history(out) -> tuple[dict[int, dict[str, float]], dict]:
    """({step: {key: value}} of the one offline run under <out>/wandb, without wandb's own `_` keys; its config)."""
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    history, config = {}, {}
    for r in wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {k: json.loads(i.value_json) for i in r.history.item
                   for k in [i.key or "/".join(i.nested_key)] if not k.startswith("_")}
            assert r.history.step.num not in history, f"step {r.history.step.num} logged twice"
            history[r.history.step.num] = row
        elif kind in ("run", "config"):  # the run's first record carries the config given to wandb.init
            update = r.run.config.update if kind == "run" else r.config.update
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update})
    return history, config


def expected(out) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), steps
    return {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in rows}


def assert_same(got, want, *, float32):
    assert sorted(got) == sorted(want)
    for step in want:
        assert sorted(got[step]) == sorted(want[step]), step
        for k, v in want[step].items():
            ref = float(np.float32(v)) if float32 else v  # TensorBoard stores a float32 simple_value
            assert got[step][k] == ref, (step, k, got[step][k], ref)


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def test_report_to_is_checked_before_anything_runs(tmp_path, capsys, monkeypatch):
    assert TrainConfig(report_to=" WandB,tensorboard,wandb").report_to == "wandb,tensorboard"
    assert TrainConfig(report_to="none").report_to == "none"
    with pytest.raises(ConfigError, match=r"--report-to 'tb': unknown reporter 'tb': expected a comma list of "
                                          r"tensorboard, wandb \(or none\)"):
        TrainConfig(report_to="tb")
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        TrainConfig(report_to="none,wandb")

    real = importlib.util.find_spec
    monkeypatch.setattr(reporters.importlib.util, "find_spec", lambda m, *a: None if m == "wandb" else real(m, *a))
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--report-to", "wandb", "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("jlora train: error: --report-to wandb: the wandb package is not installed; "
                   "pip install 'jlora[wandb]'"), err
    assert not out.exists()  # nothing ran, nothing was written
    assert main(["train", "--out", str(out), "--report-to", "tensorboard,bogus", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown reporter 'bogus'" in err and "tensorboard, wandb" in err, err


@needs_tb
@needs_wandb
def test_reporters_hold_metrics_jsonl_and_resume_cuts_them_back(tmp_path, wandb_offline):
    """MetricsLog alone (no training): a run logs 1..6 (eval at 3 and 6), then resumes from step 4 as after a
    crash; steps 5 and 6 run again with new values. Every reporter ends with metrics.jsonl's records."""
    out = tmp_path / "run"
    out.mkdir()
    path = out / "metrics.jsonl"

    def record(step, attempt):
        r = {"step": step, "loss": 3.0 / step + attempt, "lr": 1e-3 * step, "grad_norm": 0.5,
             "tokens_per_sec": 1234.5, "target_tokens": 96 + step}
        if step % 3 == 0:
            r.update(eval_loss=2.0 / step + attempt, eval_ppl=math.exp(2.0 / step + attempt))
        return r

    log = MetricsLog(path, report_to="tensorboard,wandb", run_config={"r": 4, "lr": 1e-3})
    for step in range(1, 7):
        log.write(record(step, 0))
    log.close()
    first_id = (out / "wandb" / "jlora_run_id").read_text()
    assert_same(tensorboard_history(out / "tensorboard"), expected(out), float32=True)
    assert_same(wandb_history(out)[0], expected(out), float32=False)

    log = MetricsLog(path, resume_from_step=4, report_to="tensorboard,wandb", run_config={"r": 4, "lr": 1e-3})
    for step in (5, 6, 7):
        log.write(record(step, 1))
    log.close()
    want = expected(out)
    assert list(want) == [1, 2, 3, 4, 5, 6, 7] and want[6]["loss"] == 0.5 + 1  # the second attempt's values
    assert_same(tensorboard_history(out / "tensorboard"), want, float32=True)
    history, config = wandb_history(out)
    assert_same(history, want, float32=False)
    assert config["r"] == 4 and (out / "wandb" / "jlora_run_id").read_text() == first_id  # one run, resumed


@pytest.mark.slow  # two tiny runs with compiles: ~30 s of CPU, ~100 s on the loaded shared box
@needs_tb
@needs_wandb
def test_jlora_train_report_to_tensorboard_and_wandb(tmp_path, wandb_offline, capsys):
    """A real (tiny) run with eval, then the same run resumed from its step-2 checkpoint as if it had died."""
    import shutil

    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--steps", "4", "--eval-every", "2", "--save-every", "2", "--batch-size",
            "2", "--seq-len", "32", "--r", "4", "--no-progress", "--report-to", "tensorboard,wandb"]
    assert main(args) == 0, capsys.readouterr().err
    want = expected(out)
    assert list(want) == [1, 2, 3, 4] and "eval_loss" in want[2] and "eval_loss" in want[4]
    assert_same(tensorboard_history(out / "tensorboard"), want, float32=True)
    history, config = wandb_history(out)
    assert_same(history, want, float32=False)
    assert config["report_to"] == "tensorboard,wandb" and config["steps"] == 4

    shutil.rmtree(out / "checkpoints" / "4")  # as if killed between the step-2 checkpoint and the end
    shutil.rmtree(out / "adapter")
    assert main(args + ["--resume"]) == 0, capsys.readouterr().err
    again = expected(out)
    assert list(again) == [1, 2, 3, 4]
    assert_same(tensorboard_history(out / "tensorboard"), again, float32=True)
    assert_same(wandb_history(out)[0], again, float32=False)
