"""Field types every config section uses: integers, floats and paths that refuse what YAML lets through."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, AllowInfNan, BaseModel, BeforeValidator, ConfigDict
from pydantic_core import PydanticCustomError


def _whole_number(value: Any) -> Any:
    """Before-validator of integer fields: no booleans, and floats only when they are whole.

    YAML ``true`` is a Python ``bool``, an ``int`` subclass that pydantic would take as 1
    (``model.hidden_size=true`` built a 1-wide model). Exponent notation gives floats
    (``train.max_steps=1e3`` is 1000.0), which are accepted when integral.
    """
    if isinstance(value, bool):
        raise PydanticCustomError("bool_for_int", "a boolean is not an integer")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PydanticCustomError("finite_number", "not a finite number")
        if not value.is_integer():
            raise PydanticCustomError("not_whole", "not a whole number")
        return int(value)
    return value


def _real_number(value: Any) -> Any:
    """Before-validator of float fields: no booleans, no integers beyond float's range.

    Integers are fine (``train.lr=1`` is 1.0); ``true`` is not a number even though it is an int.
    """
    if isinstance(value, bool):
        raise PydanticCustomError("bool_for_float", "a boolean is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("finite_number", "not a finite number")  # before gt/ge, which .nan fails obscurely
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            raise PydanticCustomError("too_large", "too large for a float") from None
    return value


def _no_nul(value: str) -> str:
    """After-validator of path fields: a NUL character makes every ``os`` call raise ValueError, not OSError."""
    if "\x00" in value:
        raise PydanticCustomError("nul_in_path", "a path cannot hold a NUL character")
    return value


#: A filesystem path given as a string.
PathStr = Annotated[str, AfterValidator(_no_nul)]
#: An integer config field: YAML ints and whole floats (``1e3``), never booleans.
Int = Annotated[int, BeforeValidator(_whole_number)]
#: A float config field: finite ints or floats, never booleans, ``.nan`` or ``.inf``.
Float = Annotated[float, BeforeValidator(_real_number), AllowInfNan(False)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
