"""The three record formats and their validation."""

from jlora.data.errors import DataError
from jlora.data.jsonl import Record

# Format name -> the fields it needs. Other fields (ids, metadata) are ignored.
FIELD_SETS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
}
_EXPECTED = " or ".join(
    "{" + ", ".join(f'"{k}"' for k in keys) + "}" for keys in FIELD_SETS.values())


def record_format(record: Record) -> str:
    """Returns "text", "prompt_completion" or "messages", after checking field types.

    Raises:
      DataError: naming the file and line, when no field set (or more than one) is
        present, or a field has the wrong type.
    """
    data = record.data
    matches = [name for name, keys in FIELD_SETS.items() if all(k in data for k in keys)]
    if len(matches) != 1:
        found = ", ".join(f'"{k}"' for k in data) or "none"
        problem = "fields of several formats" if matches else "missing fields"
        raise DataError(f"{record.where}: {problem}; expected exactly one of the field sets "
                        f"{_EXPECTED}, found fields {found}")
    name = matches[0]
    if name == "messages":
        _check_messages(record)
    else:
        for key in FIELD_SETS[name]:
            if not isinstance(data[key], str):
                raise DataError(f'{record.where}: field "{key}" must be a string, '
                                f"found {type(data[key]).__name__}")
    return name


def _check_messages(record: Record) -> None:
    messages = record.data["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{record.where}: field "messages" must be a non-empty list of '
                        f'{{"role", "content"}} objects, found {messages!r:.80}')
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f'{record.where}: messages[{i}] must be an object with string fields '
                            f'"role" and "content", found {message!r:.80}')
