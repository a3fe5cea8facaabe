"""metrics.jsonl and samples.jsonl are cut back to the resumed step by one rule (jlora/train/jsonl_resume.py):
a torn last line (a write cut short by a kill) is dropped by both, a bad line elsewhere fails both naming it."""
import json

import pytest

from jlora.train import samples
from jlora.train.metrics import MetricsLog

LINES = [{"step": n, "prompt": "p", "answer": a, "loss": 1.0 / (n + 1)} for n, a in ((0, "a"), (2, "b"), (4, "c"))]


def _resume_both(tmp_path, text: str, step: int):
    """(metrics lines kept, samples lines kept, each file's text afterwards) for the same file contents."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "metrics.jsonl").write_text(text)
    (tmp_path / samples.FILE).write_text(text)
    log = MetricsLog(tmp_path / "m" / "metrics.jsonl", resume_from_step=step)
    s = samples.Samples(tmp_path, [samples.Prompt("p", False)], every=2, last_step=7, resume_from=step)
    return log.records(), s.records(), (tmp_path / "m" / "metrics.jsonl").read_text(), (tmp_path / samples.FILE).read_text()


@pytest.mark.parametrize("torn", ['{"step": 6, "pro', '{"step"', "\x00\x00"])
def test_a_torn_last_line_is_dropped_by_both(tmp_path, torn):
    text = "".join(json.dumps(r) + "\n" for r in LINES) + "\n" + torn  # a blank line too: dropped
    metrics, sampled, metrics_file, samples_file = _resume_both(tmp_path, text, step=4)
    assert metrics == sampled == LINES
    assert metrics_file == samples_file == "".join(json.dumps(r) + "\n" for r in LINES)  # rewritten without it


def test_lines_after_the_resumed_step_go(tmp_path):
    text = "".join(json.dumps(r) + "\n" for r in LINES)
    metrics, sampled, _, _ = _resume_both(tmp_path, text, step=2)
    assert metrics == sampled == LINES[:2]


@pytest.mark.parametrize("bad", ['{"step": 1, "lo', '{"loss": 1.0}', '[1, 2]', '{"step": "2"}'])
def test_a_bad_line_before_the_last_fails_naming_file_and_line(tmp_path, bad):
    text = json.dumps(LINES[0]) + "\n" + bad + "\n" + json.dumps(LINES[1]) + "\n"
    (tmp_path / "metrics.jsonl").write_text(text)
    (tmp_path / samples.FILE).write_text(text)
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: expected a JSON object with an integer \"step\""):
        MetricsLog(tmp_path / "metrics.jsonl", resume_from_step=4)
    with pytest.raises(ValueError, match=r"samples\.jsonl:2: expected a JSON object with an integer \"step\""):
        samples.Samples(tmp_path, [samples.Prompt("p", False)], every=2, last_step=7, resume_from=4)
    assert (tmp_path / "metrics.jsonl").read_text() == (tmp_path / samples.FILE).read_text() == text  # untouched
