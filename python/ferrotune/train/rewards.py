"""Reward functions for PPO and GRPO, named in a config (`reward_functions = ["arithmetic"]`).

A reward function maps (prompt text, completion text) to a float. Built-in names are listed in
`BUILTIN`; any other entry must be `"module:function"`, an importable Python function of the same
signature (the user's own code, imported like any Python module; nothing is evaluated from data).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from ferrotune.errors import ConfigError

TextReward = Callable[[str, str], float]

_EXPRESSION = re.compile(r"(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*$")
_LEADING_NUMBER = re.compile(r"\s*(-?\d+)")


def arithmetic(prompt: str, completion: str) -> float:
    """1 when the completion starts with the value of the `a op b =` expression that ends the
    prompt (op in + - *), else 0; also 0 when the prompt holds no such expression."""
    match = _EXPRESSION.search(prompt)
    answer = _LEADING_NUMBER.match(completion)
    if match is None or answer is None:
        return 0.0
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return 1.0 if int(answer.group(1)) == value else 0.0


def stops(prompt: str, completion: str) -> float:
    """A format reward: 1 when the completion is non-empty and ends within one line."""
    return 1.0 if completion.strip() and "\n" not in completion.strip() else 0.0


BUILTIN: dict[str, TextReward] = {"arithmetic": arithmetic, "stops": stops}


def resolve(name: str) -> TextReward:
    """A built-in reward by name, or `module:function` imported."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            f"reward_functions: {name!r} is neither built in ({', '.join(BUILTIN)}) nor 'module:function'"
        )
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"reward_functions: cannot load {name!r} ({err})") from None
    if not callable(function):
        raise ConfigError(f"reward_functions: {name!r} is not callable")
    return function  # type: ignore[no-any-return]


def token_reward(
    names: Sequence[str], weights: Sequence[float], tokenizer: Any, stop_tokens: Sequence[int]
) -> Callable[[list[int], list[int]], float]:
    """r(prompt ids, completion ids) = Σ_k w_k f_k(decoded prompt, decoded completion), the stop
    token left out of the decoded completion."""
    if not names:
        raise ConfigError("reward_functions: at least one is required")
    functions = [resolve(n) for n in names]
    weights = list(weights) or [1.0] * len(functions)
    if len(weights) != len(functions):
        raise ConfigError(f"reward_weights: {len(weights)} weights for {len(functions)} reward functions")
    stop_set = set(stop_tokens)

    def reward(prompt: list[int], completion: list[int]) -> float:
        kept = [t for t in completion if t not in stop_set]
        prompt_text, completion_text = tokenizer.decode(prompt), tokenizer.decode(kept)
        return sum(
            w * float(f(prompt_text, completion_text)) for f, w in zip(functions, weights, strict=True)
        )

    return reward
