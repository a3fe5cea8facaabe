"""What a finished run prints says exactly what to install to run its PEFT snippet, as the README does."""
from pathlib import Path

TORCH_CPU = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
PEFT = "pip install peft"


def _printed(tmp_path) -> str:
    from jlora.train.config import TrainConfig
    from jlora.train.trainer import Trainer

    lines = []
    trainer = Trainer.__new__(Trainer)  # only the printing; no run
    trainer.config, trainer.out, trainer.log = TrainConfig(), tmp_path, lines.append
    trainer._print_next_steps(tmp_path / "adapter", tmp_path / "base", [{"loss": 2.0}, {"loss": 1.0}])
    return "\n".join(lines)


def test_next_steps_name_the_cpu_torch_install_before_peft(tmp_path):
    text = _printed(tmp_path)
    assert f"  {TORCH_CPU}\n  {PEFT}\n" in text
    assert text.index(PEFT) < text.index("from peft import PeftModel")


def test_readme_gives_the_same_install_lines():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"{TORCH_CPU}\n{PEFT}\n" in readme
    assert readme.index(TORCH_CPU) < readme.index("from peft import PeftModel")
