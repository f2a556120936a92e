"""Config text in and out: YAML that reads ``1e3`` as a float, ``key.path=value`` overrides, config files.

Everything here works on plain YAML values, before any schema: it refuses what YAML can express but a
config cannot (non-string keys, recursive aliases, deep nesting) and shows values back the way a user
would type them, for the one-line messages of every section.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from distrib.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e3``, ``5e-5``, ``1E+3`` and ``1.0e3`` as floats.

    PyYAML follows YAML 1.1, whose float pattern needs a dot and a signed exponent, so ``1e3``
    and ``1.0e3`` were the *strings* '1e3' and '1.0e3' and ``train.max_steps=1e3`` was refused.
    YAML 1.2 (and every JSON reader) reads them as numbers; so do we, in files and overrides alike.
    Only implicit resolution changes: no new tags, nothing beyond ``safe_load``'s plain types.
    """


class _Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes strings :class:`_Loader` would read as floats (``output_dir: '1e3'``).

    ``<output_dir>/config.yaml`` is a config file too: it must load back to the same values.
    """


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def _parse_yaml(text: str) -> Any:
    """``yaml.load`` with :class:`_Loader` (safe: plain scalars, lists and mappings only).

    Raises:
        ValueError: a one-line reason. PyYAML signals bad input with ``YAMLError`` but also with
            ``ValueError`` (an impossible date such as 2024-13-45, ``!!int abc``) and deep nesting
            with ``RecursionError``; all of them mean "this text is not a config we can read".
    """
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        reason = e.problem or e.context or type(e).__name__
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{_one_line(reason)}{where}") from None
    except RecursionError:
        raise ValueError(f"nested more than Python can parse; keep it under {_MAX_DEPTH} levels") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
        raise ValueError(_one_line(str(e)) or type(e).__name__) from None


def _one_line(text: str) -> str:
    """The first line of ``text`` (a library's message), without trailing punctuation."""
    lines = str(text).splitlines()
    return lines[0].strip().rstrip(".:") if lines else ""


def _show(value: Any, limit: int = 60) -> str:
    """``value`` as the user would write it in YAML, on one line and at most ``limit`` characters."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, float) and not math.isfinite(value):
        text = ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    elif isinstance(value, int):
        try:
            text = str(value)
        except ValueError:  # more digits than int -> str converts
            text = f"<a {value.bit_length()}-bit integer>"
    else:
        text = repr(value)  # escapes newlines and other line breaks
    return _clip(text, limit)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dotted(parts: Any) -> str:
    """A key path for a message: ``train.lr``, or its repr if a user-typed part holds a line break or control character."""
    text = ".".join(str(p) for p in parts)
    return text if text.isprintable() else repr(text)


#: Deepest nesting a config value may have; real configs use under 10 levels, and pydantic's
#: serializer (config.yaml, the identity hash) gives up a little beyond 250.
_MAX_DEPTH = 100


def _check_tree(node: Any, source: str, path: tuple = (), _open: set | None = None, _done: set | None = None) -> None:
    """Refuse what YAML can express but a config cannot: non-string keys, self-containing aliases, deep nesting.

    A key YAML reads as a boolean or number (``on:``, ``yes:``, ``1:``) would otherwise surface as a
    confusing schema error far from its cause; an alias that contains itself (``a: &x [*x]``) makes an
    infinitely deep value, and a very deep one loads but cannot be dumped or hashed later, when the
    run is already up. Shared aliases are fine and are visited once, so a "billion laughs" document
    is checked in linear time.
    """
    _open = set() if _open is None else _open
    _done = set() if _done is None else _done
    if not isinstance(node, (dict, list)) or id(node) in _done:
        return
    where = _dotted(path) or "the top level"
    if id(node) in _open:
        raise ConfigError(
            f"{source}: the YAML alias at {where} refers to a value that contains it; remove the recursive alias"
        )
    if len(path) >= _MAX_DEPTH:
        raise ConfigError(
            f"{source}: the value at {_clip(where, 100)} is nested more than {_MAX_DEPTH} levels deep; flatten it"
        )
    _open.add(id(node))
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, child in items:
        if isinstance(node, dict) and not isinstance(key, str):
            under = f"under {where}" if path else "at the top level"
            raise ConfigError(
                f"{source}: key {_show(key)} {under} is not a string (YAML read it as {type(key).__name__}); "
                "quote it in the YAML"
            )
        _check_tree(child, source, (*path, key), _open, _done)
    _open.discard(id(node))
    _done.add(id(node))


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``key.path=value`` into the key's parts and the value, read as YAML (``1e-4`` is a float).

    An empty value (``train.exit_after_steps=``) is null. Each key part is stripped of spaces.

    Raises:
        ConfigError: no ``=``, an empty key part (``a..b=1``, ``.a=1``, ``a.=1``) or a value that is
            not valid YAML.
    """
    shown = f"override {_show(item, 100)}"
    if "=" not in item or not item.split("=", 1)[0].strip():
        raise ConfigError(f"{shown} is not key.path=value; write e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    parts = [p.strip() for p in key.split(".")]
    if not all(parts):
        raise ConfigError(f"{shown} has an empty part in the key {_show(key.strip(), 100)}; write e.g. train.lr=1e-4")
    try:
        value = _parse_yaml(raw) if raw.strip() else None
    except ValueError as e:
        raise ConfigError(f"{shown} has a value that is not valid YAML ({e}); fix it or quote it") from None
    _check_tree(value, shown, tuple(parts))
    return parts, value


def _read_config_file(path: str | Path) -> dict:
    """The mapping a config file holds.

    Raises:
        ConfigError: the path is missing, a directory or unreadable; the file is empty (or only
            comments or ``null``), not valid YAML, not a mapping, or has non-string keys.
    """
    p = Path(path)
    name = f"config file {str(p)!r}"
    if p.is_dir():
        raise ConfigError(f"{name} is a directory, not a YAML file; pass a file such as configs/pretrain/tiny.yaml")
    if not p.exists():
        raise ConfigError(f"{name} does not exist; pass a YAML file such as configs/pretrain/tiny.yaml")
    if not p.is_file():
        raise ConfigError(f"{name} is not a regular file; pass a YAML file such as configs/pretrain/tiny.yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{name} is not UTF-8 text; save it as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"{name} cannot be read ({_one_line(e.strerror or e)}); check its permissions") from None
    try:
        data = _parse_yaml(text)
    except ValueError as e:
        raise ConfigError(f"{name} is not valid YAML: {e}; fix the syntax there") from None
    if data is None:
        # Training the defaults into runs/default is never what an empty file meant.
        raise ConfigError(
            f"{name} is empty (no keys, only comments or null); add keys, e.g. start from configs/pretrain/tiny.yaml"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{name} must hold a mapping of keys, not {type(data).__name__}; write one key: value per line, "
            "e.g. 'precision: bf16'"
        )
    _check_tree(data, name)
    return data
