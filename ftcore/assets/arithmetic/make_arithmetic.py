"""Regenerates train.jsonl / eval.jsonl: two-digit addition as chat records, the task `make demo` fine-tunes the
real pretrained model on (`builtin:add-two-digits`, `builtin:add-two-digits-eval`).

{"messages": [user "What is 47 + 38?", assistant "85"]}. Gemma-3-270M, a base model, does not answer this out of
the box (it continues the text instead of answering); a few minutes of LoRA teach it the answer's form and, on
held-out sums, whether it can add. No (a, b) pair of eval.jsonl occurs in train.jsonl, in either order, so the
eval score measures the skill, not memorised answers.

Deterministic (seeded); run `python ftcore/assets/arithmetic/make_arithmetic.py` to rebuild.
"""

import json
import random
from pathlib import Path

TRAIN, EVAL = 2000, 100


def record(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "content": str(a + b)}]}


def main() -> None:
    rng = random.Random(0)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    held_out, seen = [], set()
    for a, b in pairs:
        if len(held_out) == EVAL:
            break
        held_out.append((a, b))
        seen |= {(a, b), (b, a)}
    train = [p for p in pairs if p not in seen][:TRAIN]
    here = Path(__file__).parent
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        with open(here / name, "w") as f:
            for a, b in rows:
                f.write(json.dumps(record(a, b)) + "\n")


if __name__ == "__main__":
    main()
