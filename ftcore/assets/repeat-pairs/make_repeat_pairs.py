"""Regenerates train.jsonl / eval.jsonl: preference pairs the built-in tiny model can learn in a minute. The user
asks to repeat three words; the chosen answer repeats them, the rejected one gives three other words. Records are
TRL-style conversational pairs: {"prompt": [user turn], "chosen": [assistant turn], "rejected": [assistant turn]}.
kto-train.jsonl / kto-eval.jsonl hold the same answers unpaired and as plain text, for KTO: each pair gives
{"prompt": "Repeat: w1 w2 w3\nAnswer:", "completion": " w1 w2 w3", "label": true} and the same prompt with the
rejected words, "label": false. (Plain text: the built-in model learns it in about 60 steps, where the chat form
takes KTO, which sees no pairs, well over 90.)
words-train.jsonl / words-eval.jsonl are the task itself for supervised fine-tuning and `ft eval` (the demo):
chat records {"messages": [user "Repeat: w1 w2 w3", assistant "Words: w1 w2 w3"]}; no eval triple occurs in
training, so the eval score measures the learned skill (copying), not memorised answers.

Deterministic (seeded); run `python ftcore/assets/repeat-pairs/make_repeat_pairs.py` to rebuild.
"""

import json
import random
from pathlib import Path

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "fish", "apple",
         "cloud", "piano", "lemon"]


def pair(rng: random.Random) -> dict:
    words = rng.sample(WORDS, 3)
    wrong = rng.sample([w for w in WORDS if w not in words], 3)
    return {"prompt": [{"role": "user", "content": "Repeat: " + " ".join(words)}],
            "chosen": [{"role": "assistant", "content": "Words: " + " ".join(words)}],
            "rejected": [{"role": "assistant", "content": "Words: " + " ".join(wrong)}]}


def main() -> None:
    here = Path(__file__).parent
    for name, count, seed in (("train", 400, 0), ("eval", 50, 1)):
        rng = random.Random(seed)
        with open(here / f"{name}.jsonl", "w") as f:
            pairs = [pair(rng) for _ in range(count)]
            for record in pairs:
                f.write(json.dumps(record) + "\n")
        with open(here / f"kto-{name}.jsonl", "w") as f:
            for record in pairs:
                words = record["prompt"][0]["content"].removeprefix("Repeat: ")
                for side, label in (("chosen", True), ("rejected", False)):
                    answer = record[side][0]["content"].removeprefix("Words: ")
                    f.write(json.dumps({"prompt": f"Repeat: {words}\nAnswer:", "completion": f" {answer}",
                                        "label": label}) + "\n")

    rng, seen = random.Random(2), set()
    for name, count in (("train", 400), ("eval", 50)):
        with open(here / f"words-{name}.jsonl", "w") as f:
            written = 0
            while written < count:
                words = tuple(rng.sample(WORDS, 3))
                if name == "eval" and words in seen:
                    continue
                seen.add(words)
                text = " ".join(words)
                f.write(json.dumps({"messages": [{"role": "user", "content": "Repeat: " + text},
                                                 {"role": "assistant", "content": "Words: " + text}]}) + "\n")
                written += 1


if __name__ == "__main__":
    main()
