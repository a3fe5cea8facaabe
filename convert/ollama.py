"""An Ollama Modelfile beside a GGUF export: ``FROM ./model.gguf`` plus the chat template in Ollama's
Go-template syntax.

Converting an arbitrary Jinja chat template to a Go template is not attempted. The templates of the
families jlora knows are recognised by their markers and written as their Go equivalents (Ollama's own
library templates, reduced to messages without tools):

    ChatML (Qwen2, Qwen3 ...)   <|im_start|>role\\n...<|im_end|>\\n                     stop <|im_end|>
    Phi-4                       <|im_start|>role<|im_sep|>...<|im_end|>                stop <|im_end|>
    Llama 3                     <|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>  stop <|eot_id|>
    Gemma 2/3                   <start_of_turn>user|model\\n...<end_of_turn>\\n           stop <end_of_turn>
    Phi-3                       <|role|>\\n...<|end|>\\n                                stop <|end|>
    jlora's demo template       <|role|>\\n...\\n, assistant turns end in </s>          stop </s>

A system turn is written as its own turn: Gemma's templates fold it into the first user turn instead,
and Qwen's add a default system prompt when there is none; those differences are not converted. Checked by
rendering conversations through the published templates (tests/data/templates) and a Go-template subset.
Any other template: the Modelfile gets no TEMPLATE and says so in a comment (the GGUF still carries
the Jinja template in ``tokenizer.chat_template``, which llama.cpp's server applies itself).
"""
from __future__ import annotations

from pathlib import Path

from jlora.atomic_files import write_text

CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
          "{{ end }}<|im_start|>assistant\n")
LLAMA3 = ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
          "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
PHI4 = ("{{- range .Messages }}<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}<|im_end|>"
        "{{ end }}<|im_start|>assistant<|im_sep|>")
PHI3 = "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"
GEMMA = ("{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
         "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n")
JLORA_DEMO = ("{{- range .Messages }}{{ if eq .Role \"assistant\" }}<|assistant|>\n{{ .Content }}</s>"
              "{{ else }}<|{{ .Role }}|>\n{{ .Content }}\n{{ end }}{{ end }}<|assistant|>\n")

# (name, markers that must all appear in the Jinja template, Go template, stop strings)
KNOWN = (
    ("phi4", ("<|im_start|>", "<|im_sep|>"), PHI4, ("<|im_end|>",)),
    ("chatml", ("<|im_start|>", "<|im_end|>"), CHATML, ("<|im_end|>",)),
    ("gemma", ("<start_of_turn>", "<end_of_turn>"), GEMMA, ("<end_of_turn>",)),
    ("phi3", ("<|assistant|>", "<|end|>"), PHI3, ("<|end|>",)),
    ("llama3", ("<|start_header_id|>", "<|eot_id|>"), LLAMA3, ("<|eot_id|>",)),
    ("jlora-demo", ("<|assistant|>\\n", "'<|' + message['role'] + '|>\\n'"), JLORA_DEMO, ("</s>",)),
)


def go_template(chat_template: str | None) -> tuple[str | None, str | None, tuple[str, ...]]:
    """(family name, Go template, stop strings) for a Jinja chat template, or (None, None, ()) if unknown."""
    if isinstance(chat_template, str):
        text = chat_template.replace("\n", "\\n")  # a template read from JSON may hold real newlines
        for name, markers, template, stops in KNOWN:
            if all(m in text or m in chat_template for m in markers):
                return name, template, stops
    return None, None, ()


def modelfile_text(gguf_name: str, chat_template: str | None) -> str:
    name, template, stops = go_template(chat_template)
    lines = [f"FROM ./{gguf_name}"]
    if template is None:
        why = "the model has no chat template" if not chat_template else \
            "its chat template is not one jlora converts (ChatML, Phi-4, Llama 3, Gemma, Phi-3, jlora's demo)"
        lines += [f"# No TEMPLATE: {why}. Write one in Go-template syntax if you chat with this model",
                  "# through Ollama; the GGUF carries the Jinja template as tokenizer.chat_template."]
    else:
        lines += [f"# TEMPLATE converted from the {name} chat template", f'TEMPLATE """{template}"""']
        lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path, chat_template: str | None) -> Path:
    """Writes ``Modelfile`` beside ``gguf_path`` (``ollama create NAME -f Modelfile`` in that directory)."""
    gguf_path = Path(gguf_path)
    out = gguf_path.parent / "Modelfile"
    write_text(out, modelfile_text(gguf_path.name, chat_template))
    return out
