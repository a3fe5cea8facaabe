"""Samples during training (`--sample-every`, jlora/train/samples.py): they change no training number (metrics.jsonl
and the adapter bit-equal with and without them), a resumed run's samples.jsonl equals the uninterrupted run's
(lines after the resumed step dropped, none taken twice), the greedy answers are jlora.generate's on the
adapter saved at that step, and a bad --sample-prompts file is one line naming the file and line, before any
run file is written."""
import json
import shutil

import pytest

import jlora
from jlora.cli import main
from jlora.convert.model_dir import load_tokenizer
from jlora.data.jsonl import Record
from jlora.train import samples, scan_layers
from jlora.train.config import TrainConfig
from jlora.train.trainer import Trainer
from tests.train.test_async_loop import _records, compile_once, small_data  # noqa: F401  (fixtures)

SETTINGS = dict(steps=5, batch_size=4, seq_len=48, eval_every=0, save_every=2, log_every=1, progress=False,
                dtype="float32", lr=3e-3, r=8, lora_alpha=16)
# One layout for both runs of a comparison (auto picks by the settings): the scanned model, the default, where
# samples may scan (generation runs through the scan); the slow test takes the loop.
SCAN = "sample_every" not in dict(scan_layers.LOOP_ONLY)


def _run(out, base, data, scan=False, **extra):
    config = TrainConfig(out=str(out), model=str(base), data=str(data[0]), eval=str(data[1]), scan_layers=scan,
                         **SETTINGS, **extra)
    return Trainer(config, log=lambda *a: None).run()


def _samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_samples_change_no_number(tmp_path, default_base, small_data, compile_once):
    _run(tmp_path / "plain", default_base, small_data, scan=SCAN)
    _run(tmp_path / "sampled", default_base, small_data, scan=SCAN, sample_every=2)
    assert not (tmp_path / "plain" / "samples.jsonl").exists()
    assert _records(tmp_path / "sampled") == _records(tmp_path / "plain")  # floats compared exactly
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "sampled" / adapter).read_bytes() == (tmp_path / "plain" / adapter).read_bytes()

    full = _samples(tmp_path / "sampled")
    prompts = [r["prompt"] for r in full if r["step"] == 0]
    assert prompts == [json.loads(line)["prompt"] for line in small_data[1].read_text().splitlines()[:3]]
    assert [r["step"] for r in full] == [s for s in (0, 2, 4, 5) for _ in prompts]  # before, every 2, the end
    assert [r["answer"] for r in full if r["step"] == 0] != [r["answer"] for r in full if r["step"] == 5]


@pytest.mark.slow  # three more runs (~15 s of CPU); the file's resume rule is checked without a model below
def test_resumed_samples_equal_the_uninterrupted_runs_and_generate(tmp_path, default_base, small_data,
                                                                   compile_once):
    _run(tmp_path / "sampled", default_base, small_data, sample_every=2)
    full = _samples(tmp_path / "sampled")
    prompts = [r["prompt"] for r in full if r["step"] == 0]

    # The answers are jlora.generate's, greedy, on the base + the adapter the run saved at the end.
    model = jlora.load_adapter(jlora.load_hf(default_base), tmp_path / "sampled" / "adapter")
    want = jlora.generate(model, load_tokenizer(default_base), prompts, max_new_tokens=samples.MAX_NEW_TOKENS)
    assert [r["answer"] for r in full if r["step"] == 5] == list(map(str, want))

    # A kill after step 4's samples but before its checkpoint: resume from step 2 drops the later lines.
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "sampled", killed)
    for name in ("4", "5"):
        shutil.rmtree(killed / "checkpoints" / name)
    shutil.rmtree(killed / "adapter")
    with open(killed / "samples.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "prompt": "stale", "answer": "from the killed run"}) + "\n")
    _run(killed, default_base, small_data, sample_every=2, resume=True)
    assert _samples(killed) == full
    assert _records(killed) == _records(tmp_path / "sampled")


def test_resume_keeps_the_lines_through_the_resumed_step(tmp_path):
    lines = [{"step": n, "prompt": "p", "answer": a} for n, a in ((0, "a"), (2, "b"), (4, "c"))]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "pro')
    s = samples.Samples(tmp_path, [samples.Prompt("p", False)], every=2, last_step=7, resume_from=2)
    assert _samples(tmp_path) == lines[:2]  # rewritten at once: step 4 runs again
    assert [n for n in range(8) if s.due(n)] == [4, 6, 7]  # 0 and 2 are there: not taken twice
    fresh = samples.Samples(tmp_path / "new", [samples.Prompt("p", False)], every=2, last_step=7)
    assert [n for n in range(8) if fresh.due(n)] == [0, 2, 4, 6, 7]


def test_bad_sample_prompts_file_is_one_line_before_the_run(tmp_path, default_base, small_data, capsys):
    def train(prompts):
        out = tmp_path / "r"
        code = main(["train", "--model", str(default_base), "--data", str(small_data[0]), "--out", str(out),
                     "--sample-every", "2", "--sample-prompts", str(prompts), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and not out.exists()
        assert len(err.splitlines()) == 1, err
        return err

    assert f"{tmp_path / 'missing.jsonl'}: cannot read the prompts file" in train(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q: 2 + 2?\\nA:"}\n\n{"question": "no prompt here"}\n')
    err = train(bad)
    assert f'{bad} line 3: expected an object with "prompt" (a string) or "messages"' in err, err
    assert main(["train", "--model", str(default_base), "--data", str(small_data[0]), "--out", str(tmp_path / "r"),
                 "--sample-prompts", str(bad)]) == 2
    assert "--sample-prompts" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_default_prompts_from_each_record_kind():
    records = [Record({"text": "the cat sat on the mat"}, "d.jsonl", 1),
               Record({"text": "word"}, "d.jsonl", 2),  # nothing to prefix: skipped
               Record({"prompt": "Q: 2 + 2?\nA:", "completion": " 4"}, "d.jsonl", 3),
               Record({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello"}]}, "d.jsonl", 4)]
    got = samples.from_records(records, count=3)
    assert got == [samples.Prompt("the cat sat", False), samples.Prompt("Q: 2 + 2?\nA:", False),
                   samples.Prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                  True)]
    assert samples.from_records(records, count=1) == got[:1]


def test_summary_shows_first_and_last_step(tmp_path):
    s = samples.Samples(tmp_path, [samples.Prompt("Q: hi\nA:", False)], every=10, last_step=25)
    assert [n for n in range(30) if s.due(n)] == [0, 10, 20, 25]
    s.lines = [json.dumps({"step": n, "prompt": "Q: hi\nA:", "answer": a}) for n, a in ((0, "zz"), (10, " x"),
                                                                                         (25, " hello"))]
    assert s.summary() == [f"samples ({tmp_path / 'samples.jsonl'}, greedy): step 0 -> step 25",
                           '  "Q: hi\\nA:"', '    before: "zz"', '    after:  " hello"']
