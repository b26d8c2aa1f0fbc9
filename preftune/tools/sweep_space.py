"""The search space of ``preftune sweep``: ``--grid`` items parsed into values and ranges, and a grid's trials.

``KEY=V1,V2,...`` lists the values a key takes (each as an override would write it: ``0.1``, ``ipo``,
``[dpo,sft]``); ``KEY=LOW:HIGH`` is an interval and ``KEY=log:LOW:HIGH`` a log-uniform one, drawn from by an
Optuna search (a grid lists values only). Pure functions: the keys and values are checked against the
config when each trial's config is loaded.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from preftune.errors import ConfigError

RANGE = re.compile(r"^(log:)?([^:,\[\]]+):([^:,\[\]]+)$")
FORM = "KEY=V1,V2,... (values), KEY=LOW:HIGH or KEY=log:LOW:HIGH (a range)"


@dataclass(frozen=True)
class Values:
    """``KEY=V1,V2,...``: the values ``key`` takes, each as its override text."""

    key: str
    texts: tuple[str, ...]


@dataclass(frozen=True)
class Range:
    """``KEY=LOW:HIGH`` (uniform) or ``KEY=log:LOW:HIGH`` (log-uniform): an interval to draw ``key`` from."""

    key: str
    low: float
    high: float
    log: bool


Dimension = Values | Range


def split_values(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: ``0.1,[dpo,sft]`` -> ``["0.1", "[dpo,sft]"]``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_dimension(item: str) -> Dimension:
    """One ``--grid`` item; a malformed one raises ``ConfigError`` (one line)."""
    key, sep, text = item.partition("=")
    key, text = key.strip(), text.strip()
    if not sep or not key or not text:
        raise ConfigError(f"--grid {item}: expected {FORM}")
    if key == "output_dir":
        raise ConfigError(
            "--grid output_dir: the sweep sets each trial's output_dir (DIR/trial_NNN); use --output-dir"
        )
    match = RANGE.match(text)
    if match and (match.group(1) or None not in (_number(match.group(2)), _number(match.group(3)))):
        low, high = _number(match.group(2)), _number(match.group(3))
        if low is None or high is None:
            raise ConfigError(f"--grid {item}: a range's ends must be numbers, e.g. {key}=log:1e-7:1e-5")
        if not low < high:
            raise ConfigError(f"--grid {item}: the range's low end must be below its high end")
        if match.group(1) and low <= 0:
            raise ConfigError(f"--grid {item}: a log range needs a low end above 0")
        return Range(key, low, high, log=bool(match.group(1)))
    values = split_values(text)
    if "" in values:
        raise ConfigError(f"--grid {item}: an empty value (expected {FORM})")
    if len(set(values)) < len(values):
        raise ConfigError(f"--grid {item}: a value is listed twice")
    return Values(key, tuple(values))


def parse_space(items: Sequence[str]) -> list[Dimension]:
    """Every ``--grid`` item, each key once."""
    space = [parse_dimension(item) for item in items]
    keys = [d.key for d in space]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"--grid {repeated[0]} is given twice: list all its values in one item")
    return space


def grid_trials(space: Sequence[Dimension]) -> list[dict[str, str]]:
    """The Cartesian product of the values, the last key varying fastest: one ``{key: text}`` per trial."""
    for dim in space:
        if isinstance(dim, Range):
            raise ConfigError(
                f"--grid {dim.key}: a range is drawn from, not listed: add --search optuna --trials N, "
                "or list the values (KEY=V1,V2,...)"
            )
    values = [[(dim.key, text) for text in dim.texts] for dim in space if isinstance(dim, Values)]
    return [dict(combination) for combination in itertools.product(*values)]


def overrides(params: Mapping[str, str]) -> list[str]:
    """A trial's ``key=value`` overrides."""
    return [f"{key}={text}" for key, text in params.items()]
