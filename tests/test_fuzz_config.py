"""The config loader, fuzzed (Hypothesis): YAML files of random sections, keys (every key the
config knows, and others) and values (wrong types, nesting, control characters, odd paths),
random text that is not a mapping, YAML anchors and aliases (up to a "billion laughs" and aliases
inside themselves) and huge values, and `section.key=value` overrides. The property:
`load_config` returns a Config (which `dump_config` writes and `load_config` reads back
unchanged) or raises a ConfigError with a bounded message, at once; never another exception."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from lorasft.config import Config, ConfigError, dump_config, load_config

BUDGET = settings(max_examples=300, deadline=None, derandomize=True, database=None)


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += _keys(kind, f"{prefix}{name}.")
    return out


KEYS = _keys(Config)
SECTIONS = list(Config.model_fields)
text = st.text(max_size=20) | st.sampled_from(
    ["", "~", "~nobody_here/x", "a\x00b", "../..", "/", "auto", "none", "1e-3", "-1", "yes"]
)
scalars = st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats() | text
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(text | st.sampled_from(KEYS), inner, max_size=3),
                      max_leaves=8)  # fmt: skip


@st.composite
def documents(draw):
    doc: dict = {}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=5)):
        section, *rest = key.split(".")
        if not rest:
            doc[section] = draw(values | st.just({}))
            continue
        node = doc.setdefault(section, {})
        if isinstance(node, dict):
            node[rest[-1]] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        doc[draw(text)] = draw(values)  # an unknown section
    if draw(st.integers(0, 9)) == 0:
        doc["stages"] = draw(st.lists(st.dictionaries(st.sampled_from(["name", "data", "train",
                                                                       "lora"]), values,
                                                      max_size=3), max_size=2))  # fmt: skip
    return doc


PATH_KEYS = ["data.train_file", "data.eval_file", "model.path", "train.deepspeed"]
odd_paths = text | st.sampled_from(["a\x00b", "~nobody_here/x", "~", "[a, b]", "[~nobody_here]"])
overrides = st.lists(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS) | text, text)
    | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(PATH_KEYS), odd_paths)
    | text,
    max_size=3,
)


def load_or_refuse(path: Path | None, items: list[str]) -> Config | None:
    try:
        return load_config(path, items)
    except ConfigError as e:
        assert str(e)
        return None


def round_trips(cfg: Config, folder: Path) -> None:
    out = folder / "dumped.yaml"
    dump_config(cfg, out)
    assert load_config(out).model_dump() == cfg.model_dump()


@BUDGET
@given(documents(), overrides)
def test_any_yaml_and_overrides_load_or_are_refused(doc, items):
    load_document(doc, items)


def load_document(doc: dict, items: list[str]) -> None:
    """The property for one case (also bench/fuzz/fuzz.py's `config` target)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        try:
            path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        except (yaml.YAMLError, UnicodeEncodeError):  # surrogates: not text a file can hold
            return
        cfg = load_or_refuse(path, items)
        if cfg is not None:
            round_trips(cfg, Path(tmp))


@BUDGET
@given(st.sampled_from(PATH_KEYS), odd_paths)
def test_odd_paths_load_or_are_refused(key, path):
    load_or_refuse(None, [f"{key}={path}"])


def test_regressions():
    """Overrides that crashed the loader (ValueError, RuntimeError), now ConfigErrors naming the key."""
    for item in ["data.train_file=a\x00b", "model.path=~nobody_here/x", "model.path=a\x00b"]:
        try:
            load_config(None, [item])
        except ConfigError as e:
            assert item.split("=")[0] in str(e)
        else:
            raise AssertionError(f"{item!r} loaded")


@BUDGET
@given(st.text(max_size=200))
def test_any_text_file_loads_or_is_refused(body):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        try:
            path.write_text(body, encoding="utf-8")
        except UnicodeEncodeError:
            return
        load_or_refuse(path, [])


@st.composite
def anchored_yaml(draw) -> str:
    """YAML text whose values are anchors and aliases: nested repeats (up to a "billion laughs"),
    an alias inside its own anchor, and huge strings, placed under random keys."""
    fan, depth = draw(st.integers(1, 12)), draw(st.integers(1, 9))
    defs = ['  a0: &a0 ["lol", 1, null]']
    defs += [f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]" for i in range(1, depth)]
    extra = draw(st.sampled_from(["", "  self: &s [*s]", "  selfmap: &m {k: *m}",
                                  '  big: &big "' + "x" * 1_000_000 + '"']))  # fmt: skip
    alias = draw(st.sampled_from([f"*a{depth - 1}", "*a0", "*s" if "self:" in extra else "*a0",
                                  "*m" if "selfmap" in extra else "*a0",
                                  "*big" if "big" in extra else "*a0"]))  # fmt: skip
    key = draw(st.sampled_from(KEYS))
    section, *rest = key.split(".")
    place = f"{section}: {alias}" if not rest else f"{section}:\n  {rest[-1]}: {alias}"
    return "\n".join([draw(st.sampled_from(["_defs:", "x-defs:"])), *defs, extra, place]) + "\n"


@settings(max_examples=100, deadline=timedelta(seconds=5), derandomize=True, database=None)
@given(anchored_yaml())
def test_anchors_and_aliases_load_or_are_refused_at_once(body):
    load_text(body)


def load_text(body: str) -> None:
    """The property for YAML text (also bench/fuzz/fuzz.py's `config` target): loaded, or refused
    with a bounded message."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(body, encoding="utf-8")
        try:
            load_config(path, [])
        except ConfigError as e:
            assert len(str(e)) < 10_000  # at most 20 lines of 400 characters, then a count


def test_billion_laughs_and_self_aliases_are_refused(tmp_path):
    """Were a hang: the error message quoted the 9**9-value list whole (and fsdp_config, a free
    dict, would have taken it and dumped it expanded)."""
    lol = ['  a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lol += [f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    for place in ["lora: {target_modules: *a8}", "train: {fsdp_config: {x: *a8}}", "zzz: *a8"]:
        path = tmp_path / "c.yaml"
        path.write_text("\n".join(["_defs:", *lol, place]) + "\n")
        with pytest.raises(ConfigError, match=r"c\.yaml: expands to more than 10,000 values"):
            load_config(path, [])
    with pytest.raises(ConfigError, match="^override train.fsdp_config: expands"):
        load_config(None, ["train.fsdp_config=&a {x: *a}"])


def test_huge_values_are_quoted_bounded():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["lora.r=" + "9" * 100 + "x" * 1_000_000])
    assert "lora.r=" in str(e.value) and len(str(e.value)) < 1000
    # found by bench/fuzz/fuzz.py (config, seeds 14 and 17): a validator's own message quoted the value
    with pytest.raises(ConfigError, match="unknown metric 'xxx") as e:
        load_config(None, ["train.metric_for_best_model=" + "x" * 1_000_000])
    assert len(str(e.value)) < 1000


def test_many_errors_make_a_bounded_message(tmp_path):
    """Found by bench/fuzz/fuzz.py (config, seeds 17-34 of 10 minutes): aliases nested under the
    expansion bound gave one error line per element, each quoting a deep value (5 kB and more)."""
    lol = ['  a0: &a0 ["lol", 1, null]']
    lol += [f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 5) + "]" for i in range(1, 5)]
    path = tmp_path / "c.yaml"
    path.write_text("\n".join(["_defs:", *lol, "lora:", "  modules_to_save: *a4"]) + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, [])
    assert "lora.modules_to_save.0=[[[[" in str(e.value) and len(str(e.value)) < 1500
    many = [f"train.{k}=x" for k in ("epochs", "max_steps", "learning_rate", "warmup_ratio",
                                      "weight_decay", "batch_size", "grad_accum")] * 4  # fmt: skip
    with pytest.raises(ConfigError, match=r"\.\.\. and \d+ more$"):
        load_config(None, [f"eval.passkey_depths=[{','.join(['x'] * 30)}]"] + many)
