"""Regenerates train.jsonl / eval.jsonl: preference pairs the built-in tiny model can learn in a minute. The user
asks to repeat three words; the chosen answer repeats them, the rejected one gives three other words. Records are
TRL-style conversational pairs: {"prompt": [user turn], "chosen": [assistant turn], "rejected": [assistant turn]}.

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
            for _ in range(count):
                f.write(json.dumps(pair(rng)) + "\n")


if __name__ == "__main__":
    main()
