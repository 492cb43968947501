"""The recipe's YAML dialect: PyYAML's safe loader with YAML 1.2 numbers and an error for a repeated key.

The dumper shares the number rules, so a string such as '1e-4' is quoted on the way out and loads back a string.
"""

from __future__ import annotations

import re
from typing import IO, Any

import yaml

__all__ = ["RecipeDumper", "RecipeLoader", "load"]

_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
# YAML 1.2 core schema numbers (plus `_` between digits, as YAML 1.1 and Python allow).
_YAML_INT = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$")
_YAML_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)
# Dropped YAML 1.1 implicit types: its int/float (octal 042, base-60 1:30, no 1e-4), dates, and `=`.
_DROPPED_TAGS = {_INT_TAG, _FLOAT_TAG, "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"}


def _yaml12_numbers(cls: type) -> type:
    """Give a PyYAML loader or dumper the recipe's number rules; the dumper needs them to quote '1e-4' strings."""
    cls.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _DROPPED_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    cls.add_implicit_resolver(_INT_TAG, _YAML_INT, list("-+0123456789"))
    cls.add_implicit_resolver(_FLOAT_TAG, _YAML_FLOAT, list("-+0123456789."))
    return cls


# libyaml parses ~50x faster than pure Python (a large recipe must not take a minute); its constructor and resolver
# are PyYAML's Python classes, so the rules below apply to both.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@_yaml12_numbers
class RecipeLoader(_SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}: YAML would silently keep only the last value; "
                        "remove one", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
    base = {"0x": 16, "0o": 8}.get(digits[:2].lower())
    try:
        return sign * (int(digits[2:], base) if base else int(digits, 10))  # 042 is 42, as in YAML 1.2
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"invalid integer {text!r}", node.start_mark) from None


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).replace("_", "").lower()
    return float(text.replace(".inf", "inf").replace(".nan", "nan"))


RecipeLoader.add_constructor(_INT_TAG, _construct_int)
RecipeLoader.add_constructor(_FLOAT_TAG, _construct_float)


@_yaml12_numbers
class RecipeDumper(yaml.SafeDumper):
    pass


def load(stream: str | IO[str]) -> Any:
    """Parse YAML text (or a text stream) with the recipe rules; raises `yaml.YAMLError`."""
    return yaml.load(stream, Loader=RecipeLoader)
