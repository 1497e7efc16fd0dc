"""Strict config handling: unknown keys are errors, overrides parse as JSON, nesting works."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from landmarks.config import apply_overrides, from_dict, merge, to_dict
from landmarks.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-3  # learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas


@dataclass
class Outer:
    name: str = "x"  # a name
    epochs: int = 3  # epochs
    flag: bool = False  # a switch
    size: int | None = None  # optional size
    opt: Inner = field(default_factory=Inner)  # nested


def test_roundtrip() -> None:
    conf = Outer(name="y", epochs=5, opt=Inner(lr=0.1))
    assert from_dict(Outer, to_dict(conf)) == conf


def test_unknown_key_is_an_error_with_its_path() -> None:
    with pytest.raises(ConfigError, match="opt.momentum"):
        from_dict(Outer, {"opt": {"momentum": 0.9}})
    with pytest.raises(ConfigError, match="epoch"):
        merge(Outer(), {"epoch": 1})


def test_types_are_checked() -> None:
    with pytest.raises(ConfigError, match="epochs"):
        from_dict(Outer, {"epochs": "many"})
    with pytest.raises(ConfigError, match="epochs"):
        from_dict(Outer, {"epochs": 2.5})
    assert from_dict(Outer, {"epochs": 2.0}).epochs == 2
    assert from_dict(Outer, {"size": None}).size is None
    assert from_dict(Outer, {"opt": {"betas": [0.8, 0.9]}}).opt.betas == (0.8, 0.9)


def test_overrides() -> None:
    conf = apply_overrides(Outer(), ["epochs=7", "opt.lr=0.5", "name=abc", "flag=true", "size=null"])
    assert (conf.epochs, conf.opt.lr, conf.name, conf.flag, conf.size) == (7, 0.5, "abc", True, None)
    with pytest.raises(ConfigError):
        apply_overrides(Outer(), ["nokey"])
    with pytest.raises(ConfigError, match="opt.nope"):
        apply_overrides(Outer(), ["opt.nope=1"])
