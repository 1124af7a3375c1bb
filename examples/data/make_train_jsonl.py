"""Writes examples/data/train.jsonl: a synthetic corpus (our own generated text, no copied text) with
enough structure that a randomly initialised language model's loss goes down quickly in a few dozen
steps: made-up place records whose facts repeat consistently across documents, small additions written
out in words and digits, counting runs and a fixed-grammar instruction log. One JSON object per line,
{"text": ...}, for axolotl's `type: completion`. Deterministic (fixed seed); stdlib only.

    python3 examples/data/make_train_jsonl.py [--lines 3000] [--out examples/data/train.jsonl]
"""

import argparse
import json
import os
import random

SYLLABLES = ["ka", "ve", "lo", "tri", "man", "sor", "el", "dun", "qua", "ri", "bel", "ost", "nir", "pa",
             "zen", "ur", "mo", "thal", "ix", "gre"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]
COLOURS = ["red", "blue", "green", "amber", "violet", "grey", "white", "black"]
TRADES = ["salt", "copper", "wool", "glass", "timber", "spice", "paper", "iron"]
DIRECTIONS = ["north", "south", "east", "west"]
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
VERBS = ["open", "close", "lift", "lower", "turn", "check"]
OBJECTS = ["valve", "gate", "lamp", "lever", "door", "pump"]


def make_world(rng, n_places=120):
    names = set()
    while len(names) < n_places:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize())
    names = sorted(names)
    world = {}
    for name in names:
        world[name] = {"colour": rng.choice(COLOURS), "trade": rng.choice(TRADES),
                       "population": rng.randint(300, 90000), "founded": rng.randint(1100, 1899)}
    for name in names:  # each place has a neighbour in a fixed direction; the relation is symmetric
        world[name]["neighbour"] = (rng.choice(names), rng.choice(DIRECTIONS))
    return names, world


def place_doc(rng, names, world):
    parts = []
    for name in rng.sample(names, rng.randint(2, 4)):
        w = world[name]
        other, d = w["neighbour"]
        parts.append(f"The town of {name} was founded in {w['founded']}. Its flag is {w['colour']} and it "
                     f"trades in {w['trade']}. {name} has a population of {w['population']}. "
                     f"{other} lies {d} of {name}, so {name} lies {OPPOSITE[d]} of {other}.")
    return " ".join(parts)


def arithmetic_doc(rng):
    lines = []
    for _ in range(rng.randint(6, 12)):
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        lines.append(f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]} ({a} + {b} = {a + b}).")
    return " ".join(lines)


def counting_doc(rng):
    start, step = rng.randint(0, 50), rng.randint(1, 7)
    seq = [str(start + i * step) for i in range(rng.randint(12, 30))]
    return f"Count from {start} in steps of {step}: " + ", ".join(seq) + "."


def log_doc(rng):
    entries, state = [], {}
    for i in range(rng.randint(5, 10)):
        verb, obj, n = rng.choice(VERBS), rng.choice(OBJECTS), rng.randint(1, 9)
        state[obj] = verb
        entries.append(f"step {i + 1}: {verb} the {obj} {NUMBER_WORDS[n]} times.")
    summary = "; ".join(f"{o} was last told to {v}" for o, v in sorted(state.items()))
    return "Maintenance log. " + " ".join(entries) + f" Summary: {summary}."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.jsonl"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    names, world = make_world(rng)
    makers = [lambda: place_doc(rng, names, world), lambda: arithmetic_doc(rng), lambda: counting_doc(rng),
              lambda: log_doc(rng)]
    with open(args.out, "w") as f:
        for _ in range(args.lines):
            f.write(json.dumps({"text": rng.choice(makers)()}) + "\n")
    print(f"wrote {args.lines} lines, {os.path.getsize(args.out)} bytes to {args.out}")


if __name__ == "__main__":
    main()
