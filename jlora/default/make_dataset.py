"""Regenerate the bundled demo dataset: ``python -m jlora.default.make_dataset``.

Four templated question/answer tasks in prompt/completion form, drawn with a fixed
seed so the files are byte-identical on every run:

    capital   Q: What is the capital of France?\\nA:      -> " The capital of France is Paris."
    opposite  Q: What is the opposite of hot?\\nA:        -> " The opposite of hot is cold."
    sum       Q: What is 3 plus 4?\\nA:                   -> " 3 plus 4 is 7."
    reverse   Q: Reverse the words: cat sun red.\\nA:     -> " red sun cat."

The answers restate the question, so most completion tokens are predictable from the
prompt and a LoRA adapter on a tiny random-initialised model drives the loss down fast;
the facts themselves (32 capitals, 48 opposites, 100 sums) are small enough to memorise.
Eval asks the same facts with a phrasing never seen in training (capital, opposite,
sum) or word lists that do not occur in training (reverse).
"""

import json
import pathlib
import random

SEED = 20240611
NUM_TRAIN = 2000
NUM_EVAL = 160

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Russia": "Moscow", "Greece": "Athens",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Austria": "Vienna", "Ireland": "Dublin", "Cuba": "Havana", "Brazil": "Brasilia",
    "Argentina": "Buenos Aires", "Australia": "Canberra", "Turkey": "Ankara",
    "Iran": "Tehran", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Nigeria": "Abuja",
    "Ghana": "Accra",
}
OPPOSITE_PAIRS = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
    ("old", "young"), ("happy", "sad"), ("light", "dark"), ("early", "late"),
    ("open", "closed"), ("full", "empty"), ("hard", "soft"), ("wet", "dry"),
    ("high", "low"), ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"),
    ("thick", "thin"), ("left", "right"), ("in", "out"), ("win", "lose"),
    ("push", "pull"), ("near", "far"), ("long", "short"),
]
OPPOSITES = dict(OPPOSITE_PAIRS + [(b, a) for a, b in OPPOSITE_PAIRS])
WORDS = ["cat", "dog", "sun", "moon", "red", "blue", "tree", "fish",
         "bird", "star", "rain", "snow", "milk", "bread", "ship", "road"]

# (train phrasings, eval phrasing) per fact task.
CAPITAL_Q = (["What is the capital of {x}?", "Which city is the capital of {x}?"],
             "Name the capital of {x}.")
OPPOSITE_Q = (["What is the opposite of {x}?", "Which word is the opposite of {x}?"],
              "Name the opposite of {x}.")
SUM_Q = (["What is {a} plus {b}?", "Add {a} and {b}."], "How much is {a} plus {b}?")


def _capital(rng, held_out):
    country = rng.choice(sorted(CAPITALS))
    question = CAPITAL_Q[1] if held_out else rng.choice(CAPITAL_Q[0])
    return question.format(x=country), f"The capital of {country} is {CAPITALS[country]}."


def _opposite(rng, held_out):
    word = rng.choice(sorted(OPPOSITES))
    question = OPPOSITE_Q[1] if held_out else rng.choice(OPPOSITE_Q[0])
    return question.format(x=word), f"The opposite of {word} is {OPPOSITES[word]}."


def _sum(rng, held_out):
    a, b = rng.randrange(10), rng.randrange(10)
    question = SUM_Q[1] if held_out else rng.choice(SUM_Q[0])
    return question.format(a=a, b=b), f"{a} plus {b} is {a + b}."


def _reverse(rng, held_out):
    del held_out  # eval word lists are kept apart by rejecting training duplicates
    words = [rng.choice(WORDS) for _ in range(3)]
    return f"Reverse the words: {' '.join(words)}.", " ".join(reversed(words)) + "."


TASKS = [_capital, _opposite, _sum, _reverse]


def make_examples(seed=SEED, num_train=NUM_TRAIN, num_eval=NUM_EVAL):
    """Returns (train, eval): lists of {"prompt", "completion"} dicts, deterministic in seed."""
    rng = random.Random(seed)

    def draw(held_out):
        question, answer = rng.choice(TASKS)(rng, held_out)
        return {"prompt": f"Q: {question}\nA:", "completion": f" {answer}"}

    train = [draw(held_out=False) for _ in range(num_train)]
    seen = {(ex["prompt"], ex["completion"]) for ex in train}
    held = []
    while len(held) < num_eval:
        ex = draw(held_out=True)
        if (ex["prompt"], ex["completion"]) not in seen:
            held.append(ex)
    return train, held


def write_jsonl(path, examples):
    lines = [json.dumps(ex, ensure_ascii=True) + "\n" for ex in examples]
    pathlib.Path(path).write_text("".join(lines), encoding="utf-8")


def main():
    here = pathlib.Path(__file__).parent
    train, held = make_examples()
    write_jsonl(here / "train.jsonl", train)
    write_jsonl(here / "eval.jsonl", held)
    print(f"wrote {len(train)} train and {len(held)} eval examples to {here}")


if __name__ == "__main__":
    main()
