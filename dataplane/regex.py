"""Regular expressions in routes: RE2 semantics, as Envoy and the Gateway API use them.

RE2 matches in time linear in the input, whatever the pattern, so no pattern a route's
author writes (`(a+)+`, `([a-z]+)*@x`) can stall the dataplane for other routes. Patterns
RE2 cannot compile (backreferences, look-around) are refused where they are written.

The pybind11 object under google-re2's `re` look-alike is used directly: the look-alike
builds a generator and a match object per call (about 8 us); a bare anchored match with
captures off costs about 2 us.
"""

from __future__ import annotations

from re2 import _re2

# RE2's memory budget per pattern (program and DFA cache; past it RE2 falls back to a
# slower, still linear, engine): bounds what 10,000 routes with patterns can hold.
MAX_MEM = 1 << 20
_ANCHOR_BOTH = _re2.RE2.Anchor.ANCHOR_BOTH
_NO_MATCH = (-1, -1)


class PatternError(ValueError):
    """The pattern is not valid RE2 syntax; the message says why."""


def _options() -> _re2.RE2.Options:
    options = _re2.RE2.Options()
    options.log_errors = False  # RE2 would write each refused pattern to stderr
    options.never_capture = True  # only whether it matches is wanted
    options.max_mem = MAX_MEM
    return options


class Pattern:
    """A compiled pattern that matches a whole string."""

    __slots__ = ("_regexp", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self._regexp = _re2.RE2(source.encode(), _options())
        if not self._regexp.ok():
            raise PatternError(self._regexp.error().decode("utf-8", "replace"))

    def fullmatch(self, text: str) -> bool:
        data = text.encode()
        return bool(self._regexp.Match(_ANCHOR_BOTH, data, 0, len(data))[0] != _NO_MATCH)


def problem(source: str) -> str | None:
    """Why source is not a usable RE2 pattern, or None."""
    try:
        Pattern(source)
    except PatternError as err:
        return f"not a valid RE2 regular expression: {err}"
    return None
