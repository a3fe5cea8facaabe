"""A run killed (SIGKILL, from outside) after a checkpoint resumes with bit-equal per-step losses; `--resume`
refuses settings that would not continue the run exactly, unless `--force`."""
import json
import os
import signal
import subprocess
import sys

from jlora.cli import main
from jlora.train.metrics import MetricsLog

ARGS = ["--steps", "12", "--save-every", "4", "--batch-size", "4", "--grad-accum", "2", "--seq-len", "48",
        "--eval-every", "0", "--lora-dropout", "0.1", "--no-progress"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _command(out, *extra):
    return [sys.executable, "-m", "jlora.cli", "train", "--out", str(out), *ARGS, *extra]


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _checkpoints(out):
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, run_until_checkpoint):
    # the uninterrupted run goes alongside the one to kill (each compiles mostly on one core: ~25 s saved)
    with open(tmp_path / "full.err", "w") as full_err:
        full = subprocess.Popen(_command(tmp_path / "full"), env=ENV, stdout=subprocess.DEVNULL, stderr=full_err)
        try:
            killed = tmp_path / "killed"
            [(rc, _, err)] = run_until_checkpoint([_command(killed)], [ENV], killed / "checkpoints" / "4")
            assert full.wait(timeout=600) == 0, (tmp_path / "full.err").read_text()[-2000:]
        finally:
            if full.poll() is None:
                full.kill()
    assert rc == -signal.SIGKILL, err[-2000:]
    saved = _checkpoints(killed)  # 4, or 4 and 8 if the kill came late; never the end
    assert saved[0] == 4 and saved[-1] < 12 and not (killed / "adapter").exists()

    resumed = subprocess.run(_command(killed, "--resume"), env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {killed.resolve() / 'checkpoints' / str(saved[-1])} at step {saved[-1]}" in resumed.stdout
    want, got = _losses(tmp_path / "full"), _losses(killed)
    assert list(got) == list(range(1, 13))
    assert got == want  # bit-equal floats, dropout on


def test_resume_refuses_changed_settings_unless_forced(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["train", "--out", str(out), "--steps", "2", "--save-every", "1", "--batch-size", "2", "--seq-len", "48",
            "--eval-every", "0", "--no-progress"]
    assert main(args) == 0
    before = ((out / "metrics.jsonl").read_text(), (out / "run_config.json").read_text(), _checkpoints(out))
    capsys.readouterr()
    assert main(args + ["--resume", "--steps", "3", "--lr", "1e-3", "--seed", "1", "--mesh", "data=1"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.001 (the run has 0.003)" in err and "--seed 1 (the run has 0)" in err, err
    assert "--steps 3 (the run has 2)" in err and "--mesh" not in err and "--force" in err  # mesh may change
    assert ((out / "metrics.jsonl").read_text(), (out / "run_config.json").read_text(), _checkpoints(out)) == before

    assert main(args + ["--resume", "--force", "--steps", "3", "--lr", "1e-3"]) == 0
    assert "--resume --force: continuing with settings that differ" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((out / "run_config.json").read_text())["lr"] == 1e-3


def test_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    log = MetricsLog(path, resume_from_step=2)
    assert [r["step"] for r in log.records()] == [1, 2]
