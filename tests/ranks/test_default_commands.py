"""sweep, inspect and export end to end on the embedded default (tiny Llama + bundled data), small budget."""
import json

import numpy as np
import pytest

from jlora.cli import main
from jlora.ranks.adapter import read_adapter
from jlora.ranks.sweep import analyse
from jlora.ranks.truncate import truncate
from jlora.vllm_rules import check_vllm_adapter

RANKS = (2, 4)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sweep"
    assert main(["sweep", "--ranks", ",".join(map(str, RANKS)), "--steps", "6", "--seq-len", "32",
                 "--batch-size", "8", "--targets", "qv", "--eval-every", "3", "--save-every", "0",
                 "--out", str(out), "--no-progress"]) == 0
    return out


def test_sweep_writes_json_plot_and_runs(sweep_dir, capsys):
    report = json.loads((sweep_dir / "sweep.json").read_text())
    assert report["ranks"] == list(RANKS)
    runs = {run["r"]: run for run in report["runs"]}
    assert set(runs) == set(RANKS)
    for r, run in runs.items():
        assert run["lora_alpha"] == 2 * r  # the embedded default's alpha / r = 32 / 16
        assert run["steps"] == 6 and [s for s, _ in run["eval_curve"]] == [3, 6]
        assert (sweep_dir / f"r{r}" / "adapter" / "adapter_model.safetensors").exists()
    assert report["recommended_r"] == min(runs.values(), key=lambda run: run["eval_loss"])["r"]
    assert runs[4]["trainable_params"] == 2 * runs[2]["trainable_params"]
    assert (sweep_dir / "sweep.png").stat().st_size > 10_000
    assert report["settings"]["steps"] == 6 and report["settings"]["seed"] == 0


def test_sweep_refuses_to_overwrite(sweep_dir, capsys):
    assert main(["sweep", "--ranks", "2", "--out", str(sweep_dir), "--steps", "1", "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_inspect_json_on_default_run(sweep_dir, capsys):
    assert main(["inspect", str(sweep_dir / "r4"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 8  # 4 layers x q_proj, v_proj
    for row in rows:
        assert row["r"] == 4 and row["norm"] > 0
        assert 1 <= row["effective_rank_90"] <= row["effective_rank_99"] <= 4
    assert main(["inspect", str(sweep_dir / "r4")]) == 0
    assert (sweep_dir / "r4" / "effective_rank.png").exists()


def test_svd_to_own_rank_is_lossless_on_trained_adapter(sweep_dir):
    for m in read_adapter(sweep_dir / "r4").modules:
        t = truncate(m.a, m.b, m.scale, m.r)
        np.testing.assert_allclose(m.scale * t.b @ t.a, m.delta(), atol=1e-12 * max(np.abs(m.delta()).max(), 1e-30))


def test_export_cut_and_merge_on_default_run(sweep_dir, tmp_path, capsys):
    assert main(["export", str(sweep_dir / "r4"), "--out", str(tmp_path / "e"), "--max-lora-rank", "1",
                 "--merge"]) == 0
    out = capsys.readouterr().out
    assert "energy kept" in out and "logit drift" in out
    check_vllm_adapter(tmp_path / "e", max_lora_rank=1)
    report = json.loads((tmp_path / "e" / "export_report.json").read_text())
    assert all(m["rank"] == 1 and 0 < m["energy_kept"] < 1 for m in report["modules"])
    assert report["logit_drift"]["max_abs"] > 0
    assert (tmp_path / "e" / "merged" / "config.json").exists()
    # an export that needs no cut is the source, bit for bit
    assert main(["export", str(sweep_dir / "r4"), "--out", str(tmp_path / "same")]) == 0
    src, same = read_adapter(sweep_dir / "r4"), read_adapter(tmp_path / "same")
    for a, b in zip(src.modules, same.modules):
        np.testing.assert_array_equal(a.a, b.a)
        np.testing.assert_array_equal(a.b, b.b)


def _run(r, evals, trains):
    return {"r": r, "eval_loss": evals[-1][1], "train_loss": trains[-1], "eval_curve": evals,
            "train_loss_at_evals": trains}


def test_analyse_recommends_lowest_eval_and_flags_overfitting():
    runs = [_run(4, [[50, 2.0], [100, 1.9]], [2.1, 1.95]),
            _run(16, [[50, 1.7], [100, 1.6]], [1.8, 1.5]),
            _run(64, [[50, 1.62], [100, 1.7]], [1.6, 1.2])]
    result = analyse(runs)
    assert result["recommended_r"] == 16 and result["best_eval_loss"] == 1.6
    assert list(result["overfitting"]) == ["64"]
    reasons = result["overfitting"]["64"]
    assert any("eval loss rose" in x for x in reasons) and any("below r=16" in x for x in reasons)
    assert analyse(runs[:2])["flags"] == []
    with pytest.raises(ValueError, match="eval"):
        analyse([{**runs[0], "eval_loss": None}])
