"""`jlora generate` writes one JSON line per prompt; `jlora chat` fed by stdin keeps the history and applies
the chat template (the same shapes as test_api.py, so the compiled loop is reused)."""
import io
import json

import pytest
import transformers

import jlora
import jlora.generate.api as api
from jlora.cli import main

N = 8


def test_generate_command_writes_one_line_per_prompt(default_base, tmp_path, capsys):
    lines = [{"prompt": "What is LoRA?", "id": 1}, {"prompt": "Tell me a story"},
             {"messages": [{"role": "user", "content": "Hi"}]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["generate", "--model", str(default_base), "--prompts", str(tmp_path / "p.jsonl"),
                 "--out", str(tmp_path / "a.jsonl"), "--max-new-tokens", str(N)]) == 0
    got = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    model, tok = jlora.load_hf(default_base), transformers.AutoTokenizer.from_pretrained(default_base)
    want = jlora.generate(model, tok, ["What is LoRA?", "Tell me a story"], max_new_tokens=N) + \
        jlora.generate(model, tok, [lines[2]["messages"]], chat=True, max_new_tokens=N)
    assert [{k: v for k, v in g.items() if k not in ("completion", "token_ids", "finish_reason")} for g in got] == lines
    assert [g["completion"] for g in got] == list(want)
    assert [g["token_ids"] for g in got] == [w.token_ids for w in want]
    assert "wrote 3 answers" in capsys.readouterr().out


def test_generate_command_names_a_bad_line(default_base, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert main(["generate", "--model", str(default_base), "--prompts", str(tmp_path / "p.jsonl"),
                 "--out", str(tmp_path / "a.jsonl")]) == 2
    assert "p.jsonl line 2: expected an object with \"prompt\"" in capsys.readouterr().err
    assert main(["generate", "--model", str(default_base), "--prompts", str(tmp_path / "p.jsonl"),
                 "--out", str(tmp_path / "a.jsonl"), "--top-p", "1.5"]) == 2


def test_chat_keeps_history_and_applies_the_template(default_base, monkeypatch, capsys):
    calls = []
    real = api.generate

    def spy(model, tokenizer, prompts, **kw):
        out = real(model, tokenizer, prompts, **kw)
        calls.append(([list(m) for m in prompts], kw.get("chat"), out[0]))
        return out

    monkeypatch.setattr(api, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is LoRA?\n\nTell me more\n"))
    assert main(["chat", "--model", str(default_base), "--max-new-tokens", str(N)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(calls) == 2 and all(chat for _, chat, _ in calls)
    first, second = calls[0][2], calls[1][2]
    assert calls[1][0] == [[{"role": "user", "content": "What is LoRA?"},
                            {"role": "assistant", "content": str(first)},
                            {"role": "user", "content": "Tell me more"}]]
    assert printed[-2:] == [str(first), str(second)], "each reply is streamed, then a newline"
    tok = transformers.AutoTokenizer.from_pretrained(default_base)
    assert second.prompt_ids == list(tok.apply_chat_template(calls[1][0][0], add_generation_prompt=True,
                                                             tokenize=True, return_dict=True)["input_ids"])


def test_chat_without_template_names_the_model(default_base, tmp_path, monkeypatch, capsys):
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(default_base, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in bare.glob("chat_template.*"):
        extra.unlink()
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(bare)]) == 2
    err = capsys.readouterr().err
    assert f"{bare}" in err and "no chat template" in err, err


@pytest.mark.parametrize("argv,match", [(["chat"], "no model: pass --model"),
                                        (["generate", "--prompts", "x", "--out", "y", "--run", "a", "--adapter", "b"],
                                         "--run and --adapter")])
def test_missing_model_is_named(argv, match, capsys, tmp_path):
    if argv[0] == "generate":
        (tmp_path / "x").write_text('{"prompt": "hi"}\n')
        argv = [a if a != "x" else str(tmp_path / "x") for a in argv]
    assert main(argv) == 2
    assert match in capsys.readouterr().err
