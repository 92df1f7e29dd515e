"""Route patterns: the cost of one match with RE2 (dataplane.regex) and with Python's re.

    .venv/bin/python bench/regex.py

Typical patterns on typical paths, then the pathological ones from the hostile-input
review (a nested quantifier on a path, one on a header value) on inputs of growing length.
Python's re is timed once per length up to 24 characters: its time doubles with each one.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from dataplane.regex import Pattern  # noqa: E402

TYPICAL = [
    (r"/api/v[0-9]+/items", "/api/v2/items"),
    (r"/users/[0-9]+(/orders/[0-9]+)?", "/users/1234/orders/56"),
    (r"[a-z0-9-]+\.example\.com", "shop-eu-1.example.com"),
    (r"/static/.*\.(css|js|png)", "/static/app/" + "x" * 200 + ".js"),
]
PATHOLOGICAL = [(r"/api/(a+)+/x", "/api/{}y"), (r"([a-z]+)*@example\.com", "{}!")]


def per_match(match: object, text: str, seconds: float = 0.2) -> float:
    """Seconds per call of match(text), measured over about `seconds`."""
    call = match  # type: ignore[assignment]
    count, started = 0, time.perf_counter()
    while True:
        for _ in range(100):
            call(text)  # type: ignore[operator]
        count += 100
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return elapsed / count


def main() -> None:
    print("| pattern | input length | RE2 | Python re |")
    print("|---|---:|---:|---:|")
    for source, text in TYPICAL:
        re2_time = per_match(Pattern(source).fullmatch, text)
        re_time = per_match(re.compile(source).fullmatch, text)
        print(f"| `{source}` | {len(text)} | {re2_time * 1e6:.2f} µs | {re_time * 1e6:.2f} µs |")
    for source, shape in PATHOLOGICAL:
        compiled = re.compile(source)
        for length in (10, 16, 20, 24, 5000):
            text = shape.format("a" * length)
            re2_time = per_match(Pattern(source).fullmatch, text)
            started = time.perf_counter()
            if length <= 24:
                compiled.fullmatch(text)
                re_cell = f"{(time.perf_counter() - started) * 1e3:.1f} ms"
            else:
                re_cell = "not run (hours)"
            print(f"| `{source}` | {len(text)} | {re2_time * 1e6:.2f} µs | {re_cell} |")


if __name__ == "__main__":
    main()
