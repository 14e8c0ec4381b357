"""Reading recipe YAML with the recipe rules (see :mod:`dptrain.config`'s docstring): YAML 1.2-style numbers and
booleans, no anchors or aliases, no duplicate keys, bounded depth and size, UTF-8 text only. Every refusal is a
:class:`RecipeError` of one line naming the file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; 1 MiB leaves room for long category lists
MAX_YAML_DEPTH = 32  # recipes nest 4 levels deep


class RecipeError(ValueError):
    """A recipe is invalid; the message lists every problem, one per line."""


# ---- YAML: the recipe rules (module docstring) ----

_INT = re.compile(r"^[-+]?(?:[0-9]+(?:_[0-9]+)*|0x[0-9a-fA-F]+|0o[0-7]+)$")
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9]+(?:_[0-9]+)*(?:\.[0-9]*(?:_[0-9]+)*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?
                         |[-+]?\.?(?:inf|Inf|INF)|[-+]?(?:infinity|Infinity|INFINITY)|\.?(?:nan|NaN|NAN))$""", re.X)
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_TAG = "tag:yaml.org,2002:"


class YAMLLimit(yaml.YAMLError):
    """A recipe YAML construct refused by the recipe rules (alias, duplicate key, too deep)."""


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader with the recipe rules: YAML 1.2-style numbers and booleans, no aliases, no duplicate keys."""

    yaml_implicit_resolvers: dict = {}

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            raise YAMLLimit(f"line {ev.start_mark.line + 1}: an alias (*{ev.anchor}) is not allowed in a recipe; "
                             "write the value out")
        ev = self.peek_event()
        if getattr(ev, "anchor", None):
            raise YAMLLimit(f"line {ev.start_mark.line + 1}: an anchor (&{ev.anchor}) is not allowed in a recipe; "
                             "write each value out")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YAMLLimit(f"line {ev.start_mark.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = self.construct_object(key_node)
                try:
                    if key in seen:
                        raise YAMLLimit(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice (also on "
                                         f"line {seen[key]}); give it once")
                    seen[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: the constructor reports it
                    pass
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        text = text.lstrip("+-")
        if text[:2] in ("0x", "0o"):
            return sign * int(text[2:], 16 if text[1] == "x" else 8)
        return sign * int(text, 10)  # "012" is twelve (YAML 1.2), not octal


_RecipeLoader.add_implicit_resolver(_TAG + "bool", _BOOL, list("tTfF"))
_RecipeLoader.add_implicit_resolver(_TAG + "null", _NULL, ["~", "n", "N", ""])
_RecipeLoader.add_implicit_resolver(_TAG + "int", _INT, list("-+0123456789"))
_RecipeLoader.add_implicit_resolver(_TAG + "float", _FLOAT, list("-+0123456789.iInN"))
_RecipeLoader.add_constructor(_TAG + "int", _RecipeLoader.construct_yaml_int)


class RecipeDumper(yaml.SafeDumper):
    """Quotes every string that either the recipe rules or YAML 1.1 (``yaml.safe_load``) would read as another
    type, so the dump reads back identically with both."""


for _tag, _rx, _first in ((_TAG + "bool", _BOOL, "tTfF"), (_TAG + "int", _INT, "-+0123456789"),
                          (_TAG + "float", _FLOAT, "-+0123456789.iInN")):
    RecipeDumper.add_implicit_resolver(_tag, _rx, list(_first))


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line: where and what (PyYAML's own messages span several lines)."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(str(x) for x in (err.context, err.problem) if x)
        return " ".join(f"{where}{what}".split())
    return " ".join(str(err).split())


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def read_recipe_text(path: Path) -> str:
    """The file's text, or a RecipeError naming the file and what is wrong with it."""
    try:
        if path.is_dir():
            raise RecipeError(f"recipe {path}: is a directory, not a recipe file; give a .yaml file "
                              "(see recipes/ for ready recipes)")
        if not path.exists():
            raise RecipeError(f"recipe: no file at {path}; see recipes/ for ready recipes")
        with path.open("rb") as f:  # also a pipe, e.g. <(...) or /dev/stdin: read at most the limit
            data = f.read(MAX_RECIPE_BYTES + 1)
        if len(data) > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe {path}: more than {MAX_RECIPE_BYTES} bytes is too large for a recipe; is it "
                              "the right file?")
    except PermissionError:
        raise RecipeError(f"recipe {path}: cannot be read (permission denied)") from None
    except OSError as err:
        raise RecipeError(f"recipe {path}: cannot be read ({err.strerror or err})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(data) > 1 and (data[0] == 0) != (data[1] == 0)):
        raise RecipeError(f"recipe {path}: is UTF-16 text; save it as UTF-8")
    if b"\x00" in data:
        raise RecipeError(f"recipe {path}: is a binary file, not YAML text; give a .yaml recipe")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe {path}: is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                          "save it as UTF-8") from None
    bad = next((c for c in text if ord(c) < 32 and c not in "\t\n\r"), None)
    if bad is not None:
        raise RecipeError(f"recipe {path}: holds a control character (U+{ord(bad):04X}); is it a text file?")
    return text


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-")) or "recipe"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _message(err: dict) -> str:
    msg, value, kind = err["msg"].removeprefix("Value error, "), err.get("input"), err["type"]
    if kind == "extra_forbidden":
        return "unknown field; check the spelling (see recipes/ for examples)"
    if kind == "missing":
        return "required field is missing"
    if kind == "string_type" and isinstance(value, (bool, int, float)):
        return f"{msg}; put the value in quotes to mean the text"
    if kind == "bool_type" and isinstance(value, str):
        return f"{msg}; write true or false"
    if kind in ("int_type", "float_type") and isinstance(value, str):
        return f"{msg} such as 8, 0.5, 1e-5 or inf"
    if kind == "finite_number":
        return f"{msg} (inf and nan are not allowed here)"
    return msg


def validation_message(exc, source: str | None = None) -> str:
    """A pydantic ValidationError as the recipe's message: one problem on one line, several one per line."""
    lines = []
    for err in exc.errors():
        value = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(value, dict) else f" (got {_shown(value)})"
        lines.append(f"{_loc(err)}: {_message(err)}{shown}")
    where = f" {source}" if source else ""
    if len(lines) == 1:
        return f"invalid recipe{where}: {lines[0]}"
    return f"invalid recipe{where} ({len(lines)} problems):\n" + "\n".join(f"  {x}" for x in lines)


__all__ = ["MAX_RECIPE_BYTES", "MAX_YAML_DEPTH", "RecipeError", "read_recipe_text", "read_yaml", "yaml_problem",
           "RecipeDumper", "YAMLLimit", "validation_message"]
