"""Generate ``instructions.jsonl``, the builtin fine-tuning set (``dataset.path: builtin:instructions``).

Twenty small tasks with one fixed answer format each (string reversal, arithmetic, unit
conversion, sorting, date and JSON formatting, ...), in Alpaca format. A 135M model learns the
formats within a few dozen LoRA steps and the content only partly, so the held-out loss keeps
falling for a good learning rate and separates good hyperparameters from bad ones.

Deterministic: ``python -m loratune.data.generate_instructions`` rewrites the same file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable

WORDS = (
    "apple banana garden river stone cloud window pencil candle forest planet rocket silver "
    "orange button jacket marble ladder castle dragon mirror pillow rabbit tunnel violin wallet "
    "anchor basket bridge camera desert engine falcon guitar harbor island jungle kettle lemon "
    "meadow needle ocean pepper puzzle rain saddle tiger umbrella valley whistle yellow zebra "
    "blanket coffee dinner finger hammer helmet lizard magnet napkin parrot pocket quiet ribbon "
    "shadow spider summer table turtle velvet winter copper frozen gentle hollow purple simple "
    "bright little narrow sudden tender bottle carpet doctor feather kitten mountain"
).split()
FIRST_NAMES = "Alice Bruno Chen Dana Emil Fatima Greta Hugo Ines Jonas Kira Liam Maya Noor Omar Priya".split()
CITIES = "Oslo Lima Cairo Perth Quito Dakar Seoul Porto Tunis Riga".split()
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Russia": "Moscow",
    "Australia": "Canberra",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Chile": "Santiago",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Morocco": "Rabat",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "early": "late",
    "open": "closed",
    "full": "empty",
    "hard": "soft",
    "high": "low",
    "long": "short",
    "old": "new",
    "rich": "poor",
    "strong": "weak",
    "thick": "thin",
    "wet": "dry",
    "loud": "quiet",
    "clean": "dirty",
    "heavy": "light",
    "cheap": "expensive",
    "deep": "shallow",
    "wide": "narrow",
    "true": "false",
    "begin": "end",
    "push": "pull",
    "win": "lose",
    "buy": "sell",
    "give": "take",
    "arrive": "leave",
    "above": "below",
}

Example = tuple[str, str, str]  # instruction, input, output


def _phrase(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _numbers(rng: random.Random, count: int) -> list[int]:
    return rng.sample(range(1, 100), count)


def _decimal(value: float) -> str:
    return f"{value:g}"


def reverse(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return "Reverse the letters of the word.", word, word[::-1]


def uppercase(rng: random.Random) -> Example:
    phrase = " ".join(_phrase(rng, 2, 4))
    return "Rewrite the text in capital letters.", phrase, phrase.upper()


def add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def subtract(rng: random.Random) -> Example:
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    return "Subtract the second number from the first.", f"{a} - {b}", str(a - b)


def multiply(rng: random.Random) -> Example:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return "Multiply the two numbers.", f"{a} x {b}", str(a * b)


def kilometers(rng: random.Random) -> Example:
    km = rng.randint(1, 40) / 2
    return "Convert the distance from kilometers to meters.", f"{_decimal(km)} km", f"{_decimal(km * 1000)} m"


def hours(rng: random.Random) -> Example:
    h = rng.randint(1, 24) / 4
    return "Convert the time from hours to minutes.", f"{_decimal(h)} hours", f"{_decimal(h * 60)} minutes"


def kilograms(rng: random.Random) -> Example:
    kg = rng.randint(1, 50) / 10
    return "Convert the weight from kilograms to grams.", f"{_decimal(kg)} kg", f"{_decimal(round(kg * 1000))} g"


def sort_numbers(rng: random.Random) -> Example:
    numbers = _numbers(rng, rng.randint(3, 6))
    return (
        "Sort the numbers from smallest to largest.",
        ", ".join(map(str, numbers)),
        ", ".join(map(str, sorted(numbers))),
    )


def largest(rng: random.Random) -> Example:
    numbers = _numbers(rng, rng.randint(3, 5))
    return "Which number is the largest?", ", ".join(map(str, numbers)), str(max(numbers))


def parity(rng: random.Random) -> Example:
    number = rng.randint(1, 999)
    return "Is the number even or odd?", str(number), "even" if number % 2 == 0 else "odd"


def count_words(rng: random.Random) -> Example:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
    return "How many words are in the text?", " ".join(words), str(len(words))


def date_format(rng: random.Random) -> Example:
    year, month, day = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return "Rewrite the date in DD/MM/YYYY format.", f"{year}-{month:02d}-{day:02d}", f"{day:02d}/{month:02d}/{year}"


def to_json(rng: random.Random) -> Example:
    name, age, city = rng.choice(FIRST_NAMES), rng.randint(18, 90), rng.choice(CITIES)
    record = {"name": name, "age": age, "city": city}
    return ("Write the record as a JSON object.", f"name: {name}, age: {age}, city: {city}", json.dumps(record))


def acronym(rng: random.Random) -> Example:
    words = _phrase(rng, 2, 5)
    return "Write the acronym of the phrase.", " ".join(words), "".join(w[0] for w in words).upper()


def capital(rng: random.Random) -> Example:
    country = rng.choice(sorted(CAPITALS))
    return "What is the capital of the country?", country, CAPITALS[country]


def opposite(rng: random.Random) -> Example:
    word = rng.choice(sorted(OPPOSITES))
    return "Give the opposite of the word.", word, OPPOSITES[word]


def repeat(rng: random.Random) -> Example:
    word, times = rng.choice(WORDS), rng.randint(2, 4)
    spelled = {2: "two", 3: "three", 4: "four"}[times]
    return f"Repeat the word {spelled} times, separated by commas.", word, ", ".join([word] * times)


def last_word(rng: random.Random) -> Example:
    words = _phrase(rng, 3, 7)
    return "What is the last word of the text?", " ".join(words), words[-1]


def first_letters(rng: random.Random) -> Example:
    words = _phrase(rng, 3, 6)
    return "List the first letter of each word, separated by spaces.", " ".join(words), " ".join(w[0] for w in words)


TASKS: tuple[Callable[[random.Random], Example], ...] = (
    reverse,
    uppercase,
    add,
    subtract,
    multiply,
    kilometers,
    hours,
    kilograms,
    sort_numbers,
    largest,
    parity,
    count_words,
    date_format,
    to_json,
    acronym,
    capital,
    opposite,
    repeat,
    last_word,
    first_letters,
)


def generate(per_task: int = 20, seed: int = 0) -> list[dict[str, str]]:
    """``per_task`` distinct examples of every task (fewer where a task has fewer), shuffled."""
    rng = random.Random(seed)
    examples: list[Example] = []
    for task in TASKS:
        seen: set[Example] = set()
        for _ in range(per_task * 20):  # small pools (capitals, opposites) run out: stop trying
            if len(seen) == per_task:
                break
            example = task(rng)
            if example not in seen:
                seen.add(example)
                examples.append(example)
    rng.shuffle(examples)
    return [{"instruction": i, "input": x, "output": y} for i, x, y in examples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-task", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("instructions.jsonl"))
    args = parser.parse_args()
    records = generate(args.per_task, args.seed)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"{len(records)} examples -> {args.out}")


if __name__ == "__main__":
    main()
