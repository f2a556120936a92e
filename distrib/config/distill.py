"""``distill.*`` and ``student.*``: what a student learns from its teacher and where its weights start.

The losses these keys weigh are in :mod:`distrib.train.distill`, which also reuses the layer checks here
once the models' layer counts are known.
"""

from __future__ import annotations

from typing import Any, Sequence

from pydantic import Field, model_validator

from distrib.config.fields import Float, Int, _Section
from distrib.errors import ConfigError


#: The loss components, in the order they are summed, with the words a message uses for each.
COMPONENTS: dict[str, str] = {
    "kl": "forward KL term",
    "reverse_kl": "reverse KL term",
    "ce": "cross-entropy term",
    "hidden": "hidden-state term",
}


def _num(value: float) -> str:
    """A weight as the user wrote it: ``-1``, ``0.5``, ``1e-30``."""
    return f"{value:g}"


class DistillLossConfig(_Section):
    """Weights of the distillation loss components and the softmax temperature (see :mod:`distrib.train.distill`)."""

    #: Forward KL(teacher || student) over the vocabulary, scaled by temperature^2.
    kl: Float = 1.0
    #: Reverse KL(student || teacher), scaled by temperature^2.
    reverse_kl: Float = 0.0
    #: Next-token cross-entropy of the student on the data (temperature 1).
    ce: Float = 0.0
    #: MSE between mapped hidden states (``distill.layer_map``).
    hidden: Float = 0.0
    #: Softmax temperature of both KL terms; above 1 softens both distributions.
    temperature: Float = 1.0

    @model_validator(mode="after")
    def _check(self) -> "DistillLossConfig":
        for key, what in COMPONENTS.items():
            value = getattr(self, key)
            if value < 0:
                raise ConfigError(
                    f"distill.loss.{key}={_num(value)} must be >= 0; set it to 0 to leave the {what} out, "
                    "or to a positive weight"
                )
        if all(getattr(self, key) == 0 for key in COMPONENTS):
            raise ConfigError(
                "distill.loss: every weight is 0, so nothing would be learned; "
                "set distill.loss.kl=1 (or ce, reverse_kl, hidden)"
            )
        if self.temperature <= 0:
            raise ConfigError(
                f"distill.loss.temperature={_num(self.temperature)} must be > 0; set distill.loss.temperature=1 "
                "(or above 1 to soften both distributions)"
            )
        return self

    def weights(self) -> dict[str, float]:
        """The components with weight > 0 -> their weights, in :data:`COMPONENTS` order."""
        return {key: getattr(self, key) for key in COMPONENTS if getattr(self, key) > 0}


def _pair_problem(pair: Any) -> str | None:
    """Why ``pair`` is not a ``[student_layer, teacher_layer]`` pair of non-negative ints, or None."""
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in pair):
        return "is not a pair of layer indices; write [student_layer, teacher_layer] pairs such as [[2, 4], [4, 8]]"
    if min(pair) < 0:
        return "holds a negative layer; hidden-state indices start at 0 (the embeddings output)"
    return None


def _show_pair(pair: Any) -> str:
    return f"[{', '.join(str(x) for x in pair)}]" if isinstance(pair, (list, tuple)) else repr(pair)


def _check_pairs(layer_map: Sequence) -> None:
    """Checks of ``distill.layer_map`` that need no model: non-empty, pairs of ints >= 0, no pair twice."""
    if len(layer_map) == 0:
        raise ConfigError(
            "distill.layer_map is empty; list [student_layer, teacher_layer] pairs, or remove it for the default "
            "evenly spaced map"
        )
    seen: set[tuple[int, int]] = set()
    for pair in layer_map:
        problem = _pair_problem(pair)
        if problem:
            raise ConfigError(f"distill.layer_map: {_show_pair(pair)} {problem}")
        if tuple(pair) in seen:
            raise ConfigError(f"distill.layer_map: {_show_pair(pair)} is listed twice; list each pair once")
        seen.add(tuple(pair))


class DistillConfig(_Section):
    """What the student learns from the teacher: loss weights, which hidden states meet, projections."""

    loss: DistillLossConfig = Field(default_factory=DistillLossConfig)
    #: ``[student_layer, teacher_layer]`` pairs of HF hidden-state indices (0 = embeddings output) for the
    #: hidden-state loss; unset: student layer i -> teacher layer round(i * T / S) (see :mod:`distrib.train.distill`).
    layer_map: list[list[Int]] | None = None
    #: Learned linear projection student width -> teacher width for the hidden-state loss:
    #: null = when the widths differ, true = always, false = never (the widths must be equal).
    projection: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        if self.layer_map is not None:
            _check_pairs(self.layer_map)
        if self.loss.hidden == 0:
            for key in ("layer_map", "projection"):
                if getattr(self, key) is not None:
                    raise ConfigError(
                        f"distill.{key} is set but distill.loss.hidden is 0, so no hidden states are compared; "
                        f"set distill.loss.hidden (e.g. 1), or remove distill.{key}"
                    )
        return self


def _check_teacher_layers(layers: Sequence, n_teacher: int | None = None) -> None:
    """Checks of ``student.init_from_teacher_layers``; with ``n_teacher``, also that every index exists."""
    key = "student.init_from_teacher_layers"
    teacher = f"the teacher's {n_teacher} layers (0..{n_teacher - 1})" if n_teacher is not None else "the teacher's layers"
    if len(layers) == 0:
        raise ConfigError(
            f"{key} is empty; list which of {teacher} to copy, e.g. [0, 2], or remove it to initialise the "
            "student randomly"
        )
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool):
            raise ConfigError(f"{key}: {i!r} is not a layer index; list whole numbers such as [0, 2]")
        if i < 0:
            upto = f" to {n_teacher - 1}" if n_teacher is not None else ""
            raise ConfigError(f"{key}: {i} is negative; use teacher layer indices from 0{upto}")
        if n_teacher is not None and i >= n_teacher:
            raise ConfigError(
                f"{key}: {i} names no layer of the teacher, which has {n_teacher} layers; use indices 0..{n_teacher - 1}"
            )
    seen: set[int] = set()
    for i in layers:
        if i in seen:
            raise ConfigError(f"{key}: layer {i} is listed twice; list each of {teacher} at most once")
        seen.add(i)
    for a, b in zip(layers, layers[1:]):
        if b < a:
            raise ConfigError(
                f"{key}=[{', '.join(map(str, layers))}] is not increasing ({b} after {a}); list the teacher layers "
                f"bottom to top, e.g. [{', '.join(map(str, sorted(layers)))}]"
            )


class StudentConfig(_Section):
    """How the student starts. Its size comes from the model section; these keys only say where weights come from."""

    #: Teacher block indices (0-based, increasing) whose weights initialise the student's blocks, in order;
    #: embeddings, final norm and head are copied too. The student then has len(...) layers.
    init_from_teacher_layers: list[Int] | None = None

    @model_validator(mode="after")
    def _check(self) -> "StudentConfig":
        if self.init_from_teacher_layers is not None:
            _check_teacher_layers(self.init_from_teacher_layers)
        return self
