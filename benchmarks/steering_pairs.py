"""Write the steering pairs and tasks shipped in kvpack_integrations/demo/steering/ (run to regenerate).

Three directions, 20+ contrastive pairs each, written for this project:
- `defensive`: the same Python function with and without input validation (isinstance checks, raise);
- `docstrings`: the same function with and without a docstring;
- `formal`: the same sentence in a formal and in a casual register.
Code pairs differ only in the pattern, so the mean value difference isolates it.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "kvpack_integrations" / "demo" / "steering"

# (signature, docstring, validation lines, body lines)
FUNCTIONS = [
    (
        "def average(values):",
        "Return the arithmetic mean of a list of numbers.",
        [
            "if not isinstance(values, list):",
            "    raise TypeError('values must be a list')",
            "if not values:",
            "    raise ValueError('values must not be empty')",
        ],
        ["return sum(values) / len(values)"],
    ),
    (
        "def repeat_text(text, times):",
        "Return text repeated the given number of times.",
        [
            "if not isinstance(text, str):",
            "    raise TypeError('text must be a string')",
            "if times < 0:",
            "    raise ValueError('times must be >= 0')",
        ],
        ["return text * times"],
    ),
    (
        "def celsius_to_fahrenheit(celsius):",
        "Convert a temperature from Celsius to Fahrenheit.",
        ["if not isinstance(celsius, (int, float)):", "    raise TypeError('celsius must be a number')"],
        ["return celsius * 9 / 5 + 32"],
    ),
    (
        "def first_word(sentence):",
        "Return the first word of a sentence.",
        [
            "if not isinstance(sentence, str):",
            "    raise TypeError('sentence must be a string')",
            "if not sentence.strip():",
            "    raise ValueError('sentence is empty')",
        ],
        ["return sentence.split()[0]"],
    ),
    (
        "def safe_divide(a, b):",
        "Divide a by b.",
        [
            "if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):",
            "    raise TypeError('a and b must be numbers')",
            "if b == 0:",
            "    raise ValueError('b must not be zero')",
        ],
        ["return a / b"],
    ),
    (
        "def count_vowels(text):",
        "Count the vowels in a string.",
        ["if not isinstance(text, str):", "    raise TypeError('text must be a string')"],
        ["return sum(1 for ch in text.lower() if ch in 'aeiou')"],
    ),
    (
        "def read_lines(path):",
        "Read a text file and return its lines.",
        [
            "if not isinstance(path, str):",
            "    raise TypeError('path must be a string')",
            "if not path:",
            "    raise ValueError('path is empty')",
        ],
        ["with open(path) as handle:", "    return handle.read().splitlines()"],
    ),
    (
        "def largest(numbers):",
        "Return the largest number in a list.",
        [
            "if not isinstance(numbers, list):",
            "    raise TypeError('numbers must be a list')",
            "if not numbers:",
            "    raise ValueError('numbers must not be empty')",
        ],
        ["return max(numbers)"],
    ),
    (
        "def percentage(part, whole):",
        "Return part as a percentage of whole.",
        [
            "if whole == 0:",
            "    raise ValueError('whole must not be zero')",
            "if part < 0 or whole < 0:",
            "    raise ValueError('part and whole must be >= 0')",
        ],
        ["return 100 * part / whole"],
    ),
    (
        "def word_count(text):",
        "Count the words in a text.",
        ["if not isinstance(text, str):", "    raise TypeError('text must be a string')"],
        ["return len(text.split())"],
    ),
    (
        "def get_item(items, index):",
        "Return the item at a position in a list.",
        [
            "if not isinstance(items, list):",
            "    raise TypeError('items must be a list')",
            "if not 0 <= index < len(items):",
            "    raise IndexError('index out of range')",
        ],
        ["return items[index]"],
    ),
    (
        "def square_root(x):",
        "Return the square root of a number.",
        [
            "if not isinstance(x, (int, float)):",
            "    raise TypeError('x must be a number')",
            "if x < 0:",
            "    raise ValueError('x must be >= 0')",
        ],
        ["return x ** 0.5"],
    ),
    (
        "def join_names(names):",
        "Join a list of names with commas.",
        [
            "if not isinstance(names, list):",
            "    raise TypeError('names must be a list')",
            "if not all(isinstance(n, str) for n in names):",
            "    raise TypeError('every name must be a string')",
        ],
        ["return ', '.join(names)"],
    ),
    (
        "def parse_age(text):",
        "Parse an age from a string.",
        [
            "if not isinstance(text, str):",
            "    raise TypeError('text must be a string')",
            "if not text.strip().isdigit():",
            "    raise ValueError('age must be a whole number')",
        ],
        ["return int(text)"],
    ),
    (
        "def area_of_circle(radius):",
        "Return the area of a circle.",
        [
            "if not isinstance(radius, (int, float)):",
            "    raise TypeError('radius must be a number')",
            "if radius < 0:",
            "    raise ValueError('radius must be >= 0')",
        ],
        ["return 3.14159 * radius ** 2"],
    ),
    (
        "def reverse_list(items):",
        "Return a reversed copy of a list.",
        ["if not isinstance(items, list):", "    raise TypeError('items must be a list')"],
        ["return items[::-1]"],
    ),
    (
        "def discount(price, rate):",
        "Apply a discount rate to a price.",
        [
            "if price < 0:",
            "    raise ValueError('price must be >= 0')",
            "if not 0 <= rate <= 1:",
            "    raise ValueError('rate must be between 0 and 1')",
        ],
        ["return price * (1 - rate)"],
    ),
    (
        "def initials(full_name):",
        "Return the initials of a full name.",
        [
            "if not isinstance(full_name, str):",
            "    raise TypeError('full_name must be a string')",
            "if not full_name.split():",
            "    raise ValueError('full_name is empty')",
        ],
        ["return ''.join(part[0].upper() for part in full_name.split())"],
    ),
    (
        "def merge_dicts(a, b):",
        "Merge two dictionaries into a new one.",
        ["if not isinstance(a, dict) or not isinstance(b, dict):", "    raise TypeError('a and b must be dicts')"],
        ["result = dict(a)", "result.update(b)", "return result"],
    ),
    (
        "def is_even(n):",
        "Tell whether an integer is even.",
        ["if not isinstance(n, int):", "    raise TypeError('n must be an integer')"],
        ["return n % 2 == 0"],
    ),
    (
        "def clamp(value, low, high):",
        "Limit a value to the range from low to high.",
        ["if low > high:", "    raise ValueError('low must not exceed high')"],
        ["return max(low, min(value, high))"],
    ),
    (
        "def file_extension(filename):",
        "Return the extension of a file name.",
        [
            "if not isinstance(filename, str):",
            "    raise TypeError('filename must be a string')",
            "if '.' not in filename:",
            "    raise ValueError('filename has no extension')",
        ],
        ["return filename.rsplit('.', 1)[1]"],
    ),
]

FORMAL = [
    (
        "Thank you for your message. I shall review the document and reply by Friday.",
        "thx for the msg, i'll look at the doc and get back to u by friday",
    ),
    ("I would be grateful if you could send the report at your earliest convenience.", "can u send the report asap"),
    (
        "Please accept my apologies for the delay in responding to your enquiry.",
        "sorry i'm late getting back to you lol",
    ),
    (
        "Certainly. The meeting has been rescheduled to Tuesday at ten o'clock.",
        "yeah sure, meeting's moved to tues at 10",
    ),
    ("I regret to inform you that the application was not successful.", "bad news, you didn't get it"),
    (
        "Kindly ensure that all forms are completed before submission.",
        "just fill out all the forms before you send them",
    ),
    ("It is my pleasure to confirm your reservation for two guests.", "cool, you're booked for two"),
    (
        "Should you require any further assistance, please do not hesitate to contact me.",
        "if u need anything else just hit me up",
    ),
    (
        "The committee has reviewed the proposal and will announce its decision shortly.",
        "the committee looked at it, they'll tell you soon",
    ),
    ("I am writing to request an extension of the deadline.", "hey can i get more time on this"),
    ("We appreciate your patience while we resolve this matter.", "thanks for hanging in there while we fix this"),
    ("Your payment has been received, and a receipt will be issued in due course.", "got ur payment, receipt's coming"),
    ("I would like to express my sincere gratitude for your support.", "thanks a ton for the help!!"),
    ("Regrettably, the item you ordered is currently unavailable.", "ugh, the thing you ordered is out of stock"),
    ("Please find attached the minutes of yesterday's meeting.", "here's the notes from yesterday"),
    (
        "The results indicate a significant improvement over the previous quarter.",
        "numbers look way better than last time",
    ),
    ("May I suggest that we postpone the discussion until next week?", "let's just talk about it next week"),
    ("I trust that this information will be of use to you.", "hope this helps or whatever"),
    ("We are pleased to welcome you to the organisation.", "welcome aboard, dude"),
    (
        "I would advise caution when interpreting these preliminary figures.",
        "don't read too much into these numbers yet",
    ),
    ("The library will be closed on Monday owing to maintenance work.", "library's shut monday, they're fixing stuff"),
    (
        "Your feedback is most valuable and will be considered carefully.",
        "thanks for the feedback, we'll think about it",
    ),
]

TASKS = [
    "Write a Python function `average(values)` that returns the mean of a list of numbers.",
    "Write a Python function `celsius_to_kelvin(celsius)` that converts Celsius to Kelvin.",
    "Write a Python function `count_words(text)` that counts the words in a string.",
    "Write a Python function `safe_sqrt(x)` that returns the square root of x.",
    "Write a Python function `last_item(items)` that returns the last element of a list.",
    "Write a Python function `divide(a, b)` that divides a by b.",
    "Write a Python function `capitalize_words(text)` that capitalizes every word in a string.",
    "Write a Python function `sum_of_squares(numbers)` that returns the sum of the squares of a list of numbers.",
    "Write a Python function `read_first_line(path)` that returns the first line of a text file.",
    "Write a Python function `percent(part, total)` that returns part as a percentage of total.",
    "Write a Python function `remove_duplicates(items)` that returns a list without duplicates.",
    "Write a Python function `min_max(numbers)` that returns the smallest and largest number of a list.",
    "Write a Python function `is_palindrome(text)` that tells whether a string reads the same backwards.",
    "Write a Python function `parse_int(text)` that converts a string to an integer.",
    "Write a Python function `rectangle_area(width, height)` that returns the area of a rectangle.",
    "Write a Python function `factorial(n)` that returns n factorial.",
    "Write a Python function `get_value(mapping, key)` that returns the value stored under key in a dictionary.",
    "Write a Python function `average_length(words)` that returns the average length of a list of words.",
    "Write a Python function `median(numbers)` that returns the median of a list of numbers.",
    "Write a Python function `fahrenheit_to_celsius(fahrenheit)` that converts Fahrenheit to Celsius.",
    "Write a Python function `count_char(text, char)` that counts how often a character occurs in a string.",
    "Write a Python function `power(base, exponent)` that returns base raised to the power exponent.",
    "Write a Python function `nth_element(items, n)` that returns the n-th element of a list.",
    "Write a Python function `circle_circumference(radius)` that returns the circumference of a circle.",
    "Write a Python function `reverse_string(text)` that returns a string reversed.",
    "Write a Python function `product(numbers)` that returns the product of a list of numbers.",
    "Write a Python function `count_lines(path)` that returns the number of lines in a text file.",
    "Write a Python function `bmi(weight_kg, height_m)` that returns the body mass index.",
    "Write a Python function `flatten(nested)` that flattens a list of lists into one list.",
    "Write a Python function `second_largest(numbers)` that returns the second largest number of a list.",
    "Write a Python function `is_prime(n)` that tells whether n is a prime number.",
    "Write a Python function `parse_float(text)` that converts a string to a float.",
    "Write a Python function `triangle_area(base, height)` that returns the area of a triangle.",
    "Write a Python function `fibonacci(n)` that returns the n-th Fibonacci number.",
    "Write a Python function `merge_sorted(a, b)` that joins two lists into one sorted list.",
    "Write a Python function `word_lengths(words)` that returns a list of the lengths of the words.",
    "Write a Python function `seconds_to_minutes(seconds)` that converts seconds to minutes.",
    "Write a Python function `apply_discount(price, percent)` that returns the price after a percentage discount.",
    "Write a Python function `gcd(a, b)` that returns the greatest common divisor of two integers.",
    "Write a Python function `clamp(value, low, high)` that limits a number to the range from low to high.",
]


def _code(signature: str, lines: list[str]) -> str:
    return "```python\n" + signature + "\n" + "\n".join("    " + line for line in lines) + "\n```"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    defensive, docstrings = [], []
    for signature, doc, checks, body in FUNCTIONS:
        plain = _code(signature, body)
        defensive.append({"positive": _code(signature, checks + body), "negative": plain})
        docstrings.append({"positive": _code(signature, [f'"""{doc}"""', *body]), "negative": plain})
    rows = {
        "defensive_pairs.jsonl": defensive,
        "docstring_pairs.jsonl": docstrings,
        "formal_pairs.jsonl": [{"positive": p, "negative": n} for p, n in FORMAL],
        "code_tasks.jsonl": [{"prompt": t} for t in TASKS],
    }
    for name, items in rows.items():
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in items))
        print(f"{OUT / name}: {len(items)} rows")


if __name__ == "__main__":
    main()
