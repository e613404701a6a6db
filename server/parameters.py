"""Model config ``parameters``: every key has an owner that declares it, and a model's keys are
checked against the declarations when it loads.

config.pbtxt ``parameters`` are free-form strings, so a misspelt key or one meant for another
server would otherwise be ignored without a word. A :class:`Key` declares one key (or a family
of keys sharing a prefix, such as ``trt_shape_<input>``): its parser, its meaning and its
default. The owning component reads the key through its declaration, so each key is parsed in
one place; :func:`check` rejects a key no one declares and a value its parser refuses.

A parser takes the stripped text (the default's text when the key is unset or empty) and
raises ValueError saying what it expected, completing "parameter 'k' must be ...".
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from server.errors import ModelLoadError

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


@dataclass(frozen=True, slots=True)
class Key(Generic[T_co]):
    """One declared key, or a family of keys: ``name`` followed by any non-empty ``member``."""

    name: str
    parse: Callable[[str], T_co]
    #: One line: what the key does, for error messages and the documentation.
    meaning: str
    #: The text an unset (or empty) key stands for; parsed like a given value.
    default: str = ""
    #: For a family: what follows ``name``, e.g. "<input>"; "" for a single key.
    member: str = ""

    @property
    def label(self) -> str:
        """How the key is named to users: ``trt_shape_<input>`` for a family."""
        return self.name + self.member

    def owns(self, key: str) -> bool:
        return key.startswith(self.name) if self.member else key == self.name

    def value(self, params: Mapping[str, str], model: str, member: str = "") -> T_co:
        """The parsed value of the key (of ``name + member`` for a family), else the default."""
        key = self.name + member
        return self._parse(key, params.get(key, ""), model)

    def values(self, params: Mapping[str, str], model: str) -> dict[str, T_co]:
        """A family's given members: member -> parsed value."""
        return {key[len(self.name):]: self._parse(key, text, model)
                for key, text in params.items() if self.owns(key)}

    def _parse(self, key: str, text: str, model: str) -> T_co:
        if self.member and key == self.name:
            raise ModelLoadError(f"model '{model}' parameter '{key}' names no {self.member}; "
                                 f"the key is {self.label}")
        try:
            return self.parse(text.strip() or self.default)
        except ValueError as exc:
            raise ModelLoadError(
                f"model '{model}' parameter '{key}' must be {exc}, got {text!r}"
            ) from None


#: A rule over a model's whole parameters (several keys that must agree), run after ``check``;
#: raises ModelLoadError. Called with the parameters and the model's name.
ModelCheck = Callable[[Mapping[str, str], str], object]


def check(params: Mapping[str, str], keys: Sequence[Key[object]], model: str) -> None:
    """Raise ModelLoadError for the first key of ``params`` that none of ``keys`` owns (naming
    the keys that exist) or whose value its owner's parser refuses."""
    for key, text in sorted(params.items()):
        owner = next((k for k in keys if k.owns(key) and not k.member), None) \
            or next((k for k in keys if k.owns(key)), None)
        if owner is None:
            known = sorted(k.label for k in keys)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ModelLoadError(f"model '{model}' parameter '{key}' is not a key this model "
                                 f"can have{hint}; the keys are: {', '.join(known)}")
        owner._parse(key, text, model)


# -- parsers ---------------------------------------------------------------------------------

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("true or false")


def text(value: str) -> str:
    return value


def names(value: str) -> tuple[str, ...]:
    """Comma-separated names; empty parts are dropped."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def integer(low: int = 0, high: int | None = None) -> Callable[[str], int]:
    expected = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(expected) from None
        if number < low or (high is not None and number > high):
            raise ValueError(expected)
        return number

    return parse


def number(low: float = -math.inf, high: float = math.inf) -> Callable[[str], float]:
    expected = ("a number" if math.isinf(low) and math.isinf(high)
                else f"a number >= {low}" if math.isinf(high) else f"a number in {low}..{high}")

    def parse(value: str) -> float:
        try:
            result = float(value)
        except ValueError:
            raise ValueError(expected) from None
        if not low <= result <= high:  # NaN fails too
            raise ValueError(expected)
        return result

    return parse


def choice(*options: str, case_sensitive: bool = False) -> Callable[[str], str]:
    """One of ``options``, returned as declared (matched ignoring case unless told not to)."""

    def parse(value: str) -> str:
        for option in options:
            if value == option or (not case_sensitive and value.lower() == option.lower()):
                return option
        raise ValueError(f"one of {list(options)}")

    return parse


def optional(parse: Callable[[str], T]) -> Callable[[str], T | None]:
    """``parse``, with the empty text (an unset key without a default) meaning None."""

    def parse_optional(value: str) -> T | None:
        return parse(value) if value else None

    return parse_optional
