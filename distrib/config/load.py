"""``load_config``: a YAML file and ``key.path=value`` overrides -> a validated :class:`Config`, or one line.

Pydantic's errors become one line naming the key and the fix, with a "did you mean" for a misspelt key.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from distrib.config.root import Config
from distrib.config.yaml_io import _dotted, _one_line, _read_config_file, _show, parse_override
from distrib.errors import ConfigError


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The section class a field holds (``train`` -> TrainConfig), or None."""
    if isinstance(annotation, type) and typing.get_origin(annotation) is None and issubclass(annotation, BaseModel):
        return annotation
    return None


def _is_section(annotation: Any) -> bool:
    """Whether a field holds keys (a section, or the raw ``deepspeed`` mapping) rather than a value."""
    return _section_model(annotation) is not None or typing.get_origin(annotation) is dict


def _apply_override(data: dict, path: list[str], value: Any, item: str = "") -> None:
    """Set ``data[path[0]]...[path[-1]] = value``, creating the sections on the way.

    A part of the path that names a value in the schema (``train.lr`` in ``train.lr.x=1``) or that
    already holds a value is refused; unknown keys are left for validation, which suggests a spelling.
    """
    shown = f"override {_show(item or '.'.join(path), 100)}"
    node: dict = data
    section: type[BaseModel] | None = Config  # None under deepspeed.* and under unknown keys
    for depth, part in enumerate(path[:-1], 1):
        prefix = _dotted(path[:depth])
        field = section.model_fields.get(part) if section is not None else None
        if field is not None and not _is_section(field.annotation):
            raise ConfigError(f"{shown}: {prefix} is a value, not a section; set {prefix}=VALUE instead")
        section = _section_model(field.annotation) if field is not None else None
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"{shown}: {prefix} is already set to {_show(child)}, not a section; set {prefix}=VALUE instead"
            )
        node = child
    node[path[-1]] = value


#: Messages for the typed-scalar errors of :data:`Int` and :data:`Float`, by pydantic error type.
_SCALAR_ERRORS = {
    "bool_for_int": "{loc}={got} is a boolean, not an integer; set {loc} to a whole number",
    "bool_for_float": "{loc}={got} is a boolean, not a number; set {loc} to a number",
    "not_whole": "{loc}={got} is not a whole number; set {loc} to an integer",
    "finite_number": "{loc}={got} is not a finite number; set {loc} to a finite number",
    "too_large": "{loc}={got} is too large; set {loc} to a smaller number",
    "nul_in_path": "{loc}={got} holds a NUL character, which no path can; fix the path",
}


def _describe(err: dict, data: dict) -> str:
    """One line for pydantic's first error: the key, what is wrong with it and how to fix it."""
    loc = _dotted(err["loc"])
    # the key a user can set: the dotted path up to any list index (data.train_files, not data.train_files.0)
    key = _dotted(err["loc"][: next((i for i, p in enumerate(err["loc"]) if not isinstance(p, str)), None)])
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        section: Any = Config
        names = err["loc"][:-1]
        for p in names:
            section = _section_model(section.model_fields[p].annotation) if section is not None else None
        fields = sorted(section.model_fields) if section is not None else []
        what = "section" if isinstance(got, dict) else "key"
        close = difflib.get_close_matches(str(err["loc"][-1]), fields, n=1)
        hint = f"; did you mean {'.'.join([*map(str, names), close[0]])!r}?" if close else ";"
        unknown = ".".join(str(p) for p in err["loc"])  # repr below escapes whatever the user typed
        return f"unknown {what} {unknown!r}{hint} valid keys here: {', '.join(fields)}"
    if kind == "value_error" and isinstance(err.get("ctx", {}).get("error"), ConfigError):
        return str(err["ctx"]["error"])
    if kind in _SCALAR_ERRORS:
        return _SCALAR_ERRORS[kind].format(loc=loc, got=_show(got))
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{loc} is a section of keys, not {_show(got)}; set keys under it (e.g. {loc}.KEY=VALUE) or remove it"
    got_s = "" if isinstance(got, dict) else f" (got {_show(got)})"
    return f"{loc}: {_one_line(err['msg'])}{got_s}; fix {key} in the YAML or with {key}=VALUE"


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read YAML, apply ``key.path=value`` overrides, validate.

    Any input either gives a :class:`Config` or raises :class:`ConfigError` (one line); nothing else
    escapes, whatever the file or the overrides hold (``tests/unit/test_config_properties.py``).

    Raises:
        ConfigError: one line naming the offending key and the fix.
    """
    data: dict = _read_config_file(path) if path is not None else {}
    data = copy.deepcopy(data)
    for item in overrides:
        key, value = parse_override(item)
        _apply_override(data, key, value, item)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e.errors()[0], data)) from None
