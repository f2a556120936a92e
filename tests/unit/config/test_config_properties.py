"""Property tests: whatever the user types, the config layer answers with a Config or one line.

``parse_override`` and ``load_config`` are fed arbitrary override strings, key paths built from the
real keys and junk, values of every YAML type (huge integers, .nan, exponent notation, unicode,
nested lists and mappings) and arbitrary text as a YAML file. Each input must either load or raise
:class:`ConfigError` whose message is a single line; any other exception is a bug. A config that
loads must also pass or fail ``check_paths`` in one line, hash, hand DeepSpeed plain JSON, and dump
to a config.yaml that loads back to the same config (the trainer writes it into every checkpoint).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distrib.config import DEEPSPEED_OWNED, Config, ConfigError, load_config, parse_override
from distrib.config.load import _section_model
from tests.conftest import ROOT

TINY = ROOT / "configs/pretrain/tiny.yaml"

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _real_keys(model=Config, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        section = _section_model(field.annotation)
        if section is not None:
            keys += _real_keys(section, f"{prefix}{name}.")
    return keys


REAL_KEYS = _real_keys() + [f"deepspeed.{p}" for p in DEEPSPEED_OWNED] + ["deepspeed.zero_optimization.reduce_bucket_size"]

#: Key parts: real ones, near misses, empty, dots, spaces, unicode and YAML-ish junk.
junk_part = st.one_of(
    st.sampled_from(["", " ", "x", "trian", "max_step", "0", "true", "null", "~", "-", "é", "ключ", "a b", "\t", "1e3"]),
    st.text(max_size=6),
)
key_path = st.one_of(
    st.sampled_from(REAL_KEYS),
    st.builds(lambda k, j: f"{k}.{j}", st.sampled_from(REAL_KEYS), junk_part),
    st.lists(st.one_of(st.sampled_from([k.split(".")[-1] for k in REAL_KEYS]), junk_part), min_size=1, max_size=4).map(
        ".".join
    ),
)

#: Values as they would be typed after '=': YAML scalars of every kind, flow collections, text.
typed_value = st.one_of(
    st.sampled_from([
        "", "1", "0", "-1", "1e3", "1E+3", "5e-5", "1.0e3", "1e999", "-1e999", ".nan", ".inf", "-.inf", "1.5",
        "1000.0", "true", "false", "yes", "off", "null", "~", "[]", "{}", "[1, 2]", "{a: 1}", "{1: 2}", "{on: x}",
        "&a [*a]", "bf16", "fp8", "'quoted'", '"a\\nb"', "2024-13-45", "2024-01-01", "2024-01-01 10:00:00",
        "!!binary aGk=", "!!binary /w==", "!!set {a, b}", "[", "{a", "!!python/name:os.system", "1:30", "0x1F",
        "0o17", "1_000", "é", "ключ", "\u2028", "\x85", "a\tb",
    ]),
    st.integers().map(str),
    st.integers(min_value=10**20, max_value=10**400).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=20),
)


def _leaf_fields(model=Config, prefix: str = ""):
    """(dotted key, default) of every value field of the schema."""
    for name, field in model.model_fields.items():
        section = _section_model(field.annotation)
        if section is not None:
            yield from _leaf_fields(section, f"{prefix}{name}.")
        elif name != "deepspeed":
            yield prefix + name, field.get_default(call_default_factory=True)


LEAVES = dict(_leaf_fields())

#: Values a user could mean for any field: small numbers, booleans, null, literals of the schema.
plausible = st.one_of(
    st.integers(min_value=0, max_value=5000), st.floats(min_value=0, max_value=2, allow_nan=False),
    st.booleans(), st.none(),
    st.sampled_from(["bf16", "fp32", "llama", "gpt2", "code", "prose", "builtin", "linear", "constant", "runs/x"]),
)


def plausible_for(key: str):
    """The field's default or a plausible value."""
    return st.one_of(st.just(LEAVES[key]), plausible)


def _flow_yaml(value) -> str:
    """``value`` as one-line YAML, as it would be typed after '='."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


#: Overrides of real keys with plausible values: a good share of these load.
plausible_override = st.sampled_from(sorted(LEAVES)).flatmap(
    lambda k: plausible_for(k).map(lambda v: f"{k}={_flow_yaml(v)}")
)


def _nest(flat: dict) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


#: Config files shaped by the schema: real sections and keys, plausible values.
schema_config = st.lists(st.sampled_from(sorted(LEAVES)), unique=True, max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: plausible_for(k) for k in keys})
).map(_nest)

#: Text as argv can carry it: any code point, lone surrogates included (undecodable bytes arrive as surrogates).
any_text = st.text(st.characters(exclude_categories=()), max_size=30)
override = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", key_path, typed_value),
    plausible_override,
    any_text,
)


def assert_one_line_or_loads(fn, *args):
    """Run ``fn``; it may return (then the config must dump and hash) or raise a one-line ConfigError."""
    try:
        result = fn(*args)
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg.splitlines()) == 1, repr(msg)
        return None
    if isinstance(result, Config):
        try:
            result.check_paths()  # the CLI's next step: it stats output_dir and globs data files
        except ConfigError as e:
            assert "\n" not in str(e) and len(str(e).splitlines()) == 1, repr(str(e))
        result.identity_hash()
        json.dumps(result.deepspeed)  # what DeepSpeed is handed
        # <output_dir>/config.yaml is a config file too: it loads back to the same config
        with tempfile.TemporaryDirectory() as d:
            saved = Path(d) / "config.yaml"
            saved.write_text(result.to_yaml(), encoding="utf-8")
            again = load_config(saved)
        assert json.dumps(again.model_dump(mode="json")) == json.dumps(result.model_dump(mode="json"))
    return result


@SETTINGS
@given(st.one_of(st.text(max_size=60), any_text))
def test_parse_override_returns_a_key_path_or_raises_one_line(item):
    out = assert_one_line_or_loads(parse_override, item)
    if out is not None:
        parts, _ = out
        assert parts and all(p and p == p.strip() for p in parts)


@SETTINGS
@given(key_path, typed_value)
def test_parse_override_on_real_and_junk_keys(key, value):
    assert_one_line_or_loads(parse_override, f"{key}={value}")


@SETTINGS
@given(st.lists(override, max_size=4))
def test_load_config_with_arbitrary_overrides_loads_or_raises_one_line(overrides):
    assert_one_line_or_loads(load_config, TINY, overrides)


@pytest.fixture(scope="module")
def yaml_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("yaml")


@SETTINGS
@given(text=st.text(max_size=200))
def test_load_config_on_arbitrary_text_files(yaml_dir, text):
    path = yaml_dir / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    assert_one_line_or_loads(load_config, path)


# YAML documents that parse, shaped like configs: real and junk keys, values of any YAML type.
yaml_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**30, max_value=10**60),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
    st.sampled_from(["bf16", "fp16", "llama", "gpt2", "code", "builtin", "files", "cosine"]),
)
yaml_key = st.one_of(
    st.sampled_from(sorted({k.split(".")[-1] for k in REAL_KEYS})), st.text(max_size=8),
    st.integers(), st.booleans(), st.none(),
)
yaml_tree = st.recursive(
    yaml_scalar,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(yaml_key, children, max_size=4)),
    max_leaves=12,
)
config_like = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(list(Config.model_fields)), yaml_key), yaml_tree, max_size=5),
    schema_config,
)


@SETTINGS
@given(data=config_like, overrides=st.lists(override, max_size=2))
def test_load_config_on_config_shaped_yaml(yaml_dir, data, overrides):
    path = yaml_dir / "shaped.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    assert_one_line_or_loads(load_config, path, overrides)


@SETTINGS
@given(st.dictionaries(st.sampled_from([k for k in REAL_KEYS if k.count(".") == 1 and not k.startswith("deepspeed")]),
                       typed_value, max_size=3))
def test_tiny_yaml_with_edited_values_loads_or_raises_one_line(yaml_dir, edits):
    """The shipped config with sections re-declared at the end holding raw YAML text, as a user might edit it."""
    text = TINY.read_text() + "".join(
        f"\n{dotted.split('.')[0]}:\n  {dotted.split('.')[1]}: {raw}\n" for dotted, raw in edits.items()
    )
    path = yaml_dir / "edited.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    assert_one_line_or_loads(load_config, path)


@SETTINGS
@given(st.one_of(st.integers(min_value=1, max_value=10**6), st.floats(min_value=1, max_value=1e6).filter(float.is_integer)))
def test_whole_numbers_in_any_notation_fill_int_fields(n):
    for text in {str(int(n)), f"{float(n)!r}", f"{float(n):e}", f"{float(n):E}"}:
        cfg = load_config(TINY, [f"train.max_steps={text}", "train.warmup_steps=0"])
        assert cfg.train.max_steps == int(n) and type(cfg.train.max_steps) is int


@SETTINGS
@given(st.floats(min_value=1e-12, max_value=1e6, allow_nan=False))
def test_positive_floats_in_any_notation_fill_float_fields(x):
    for text in {repr(x), f"{x:e}", f"{x:E}", f"{x:.17g}"}:
        assert math.isclose(load_config(TINY, [f"train.lr={text}"]).train.lr, float(text))
