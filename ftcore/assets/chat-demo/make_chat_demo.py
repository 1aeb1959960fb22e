"""Regenerates train.jsonl / eval.jsonl: a small, learnable chat set (arithmetic, capitals, opposites, spelling).

Deterministic (seeded); run `python ftcore/assets/chat-demo/make_chat_demo.py` to rebuild. Facts are common knowledge.
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Ireland": "Dublin", "Austria": "Vienna", "Chile": "Santiago", "Cuba": "Havana", "Thailand": "Bangkok",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "open": "closed", "full": "empty", "high": "low", "strong": "weak", "young": "old", "wet": "dry",
}
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "garden", "window"]
SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Answer in one sentence."]


def arithmetic(rng):
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def capital(rng):
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def opposite(rng):
    word = rng.choice(sorted(OPPOSITES))
    return f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}."


def spell(rng):
    word = rng.choice(WORDS)
    return f"Spell the word {word}.", f"{word} is spelled {'-'.join(word.upper())}."


def conversation(rng):
    kinds = [arithmetic, capital, opposite, spell]
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(1 if rng.random() < 0.7 else 2):
        question, answer = rng.choice(kinds)(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main():
    rng = random.Random(1234)
    here = Path(__file__).parent
    for name, count in (("train.jsonl", 400), ("eval.jsonl", 40)):
        with open(here / name, "w") as f:
            for _ in range(count):
                f.write(json.dumps(conversation(rng)) + "\n")


if __name__ == "__main__":
    main()
