"""`jlora train` with no --model: the embedded default runs end to end and PEFT loads what it writes."""
import json

import numpy as np
import peft
import pytest
import torch

import jlora
from jlora.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "demo"
    assert main(["train", "--out", str(out), "--no-progress"]) == 0
    return out


def test_loss_halves_and_run_dir_is_complete(demo_run):
    records = [json.loads(x) for x in (demo_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(records[0])
    assert any("eval_loss" in r for r in records)
    assert records[-1]["loss"] <= records[0]["loss"] / 2
    assert (demo_run / "loss.png").stat().st_size > 10_000
    assert (demo_run / "checkpoints").is_dir()


def test_adapter_names_local_base_and_loads_in_peft(demo_run, close32, logits32_and_64):
    cfg = json.loads((demo_run / "adapter" / "adapter_config.json").read_text())
    base_dir = cfg["base_model_name_or_path"]
    assert base_dir == str((demo_run / "base").resolve())
    import transformers
    ref = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32),
        demo_run / "adapter").eval()
    ids = np.random.RandomState(0).randint(3, 200, (1, 16))
    want, want64 = logits32_and_64(ref, ids)
    ours = np.asarray(jlora.load_adapter(jlora.load_hf(base_dir), demo_run / "adapter")(ids))
    close32(ours, want, want64, what="demo adapter")


def test_second_run_into_same_dir_is_refused(demo_run, capsys):
    assert main(["train", "--out", str(demo_run), "--steps", "2", "--no-progress"]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert (demo_run / "adapter" / "adapter_model.safetensors").exists()  # nothing lost


def test_demo_samples_one_prompt_before_during_and_after(demo_run):
    lines = [json.loads(x) for x in (demo_run / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 50, 100, 150]  # DEMO_SETTINGS sample_every=50, 150 steps
    assert len({r["prompt"] for r in lines}) == 1 and lines[0]["prompt"].startswith("Q: ")
    assert lines[0]["answer"] != lines[-1]["answer"]
