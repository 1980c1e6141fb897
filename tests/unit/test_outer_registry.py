"""The outer optimizers' one registry: every name the configuration accepts is a spec
(config/schema.py's ``OUTER_METHODS``) and a class (algorithms/outer.py's ``OUTER_OPTIMIZERS``) that
builds from its settings, describes itself on the start-up line and has the report's label.

Expected texts are written out here, as the start-up line and the report have always printed them.
"""

from __future__ import annotations

import typing

import pytest

from hpc_localsgd.algorithms.outer import OUTER_OPTIMIZERS, OuterNesterov, PlainAverage, SlowMo, build_outer_optimizer
from hpc_localsgd.config import load_config
from hpc_localsgd.config.schema import OUTER_METHODS, OuterMethod
from hpc_localsgd.errors import ConfigError
from hpc_localsgd.report import collect
from hpc_localsgd.train.run import describe_method

ACCEPTED = typing.get_args(OuterMethod)


def test_the_schema_the_specs_and_the_classes_name_the_same_methods_in_one_order() -> None:
    assert ACCEPTED == tuple(OUTER_METHODS) == tuple(OUTER_OPTIMIZERS) == ("none", "slowmo", "nesterov")
    for name, cls in OUTER_OPTIMIZERS.items():
        assert cls.spec is OUTER_METHODS[name] and cls.spec.name == name


@pytest.mark.parametrize("name", ACCEPTED)
def test_every_accepted_name_builds_with_the_settings_its_spec_names(name: str) -> None:
    overrides = ["algorithm.slow_lr=0.8", "algorithm.slow_momentum=0.25", "algorithm.outer_lr=0.5"]
    cfg = load_config(None, [f"algorithm.outer={name}", "algorithm.outer_momentum=0.75", *overrides])
    outer = build_outer_optimizer(cfg.algorithm)
    assert type(outer) is OUTER_OPTIMIZERS[name]
    for setting, _ in OUTER_METHODS[name].settings:
        assert getattr(outer, setting) == getattr(cfg.algorithm, setting)
    assert describe_method(cfg).startswith("local SGD H=4")
    assert collect.method_label("local_sgd", name) in collect.METHOD_ORDER
    assert collect.method_label("post_local_sgd", name) in collect.METHOD_ORDER


def test_the_classes_take_their_settings_from_the_configuration() -> None:
    def built(outer: str) -> object:
        return build_outer_optimizer(load_config(None, [f"algorithm.outer={outer}"]).algorithm)

    plain, slowmo, nesterov = built("none"), built("slowmo"), built("nesterov")
    assert type(plain) is PlainAverage and not plain.needs_anchor
    assert isinstance(slowmo, SlowMo) and (slowmo.slow_lr, slowmo.slow_momentum) == (1.0, 0.5)
    assert isinstance(nesterov, OuterNesterov) and (nesterov.outer_lr, nesterov.outer_momentum) == (0.7, 0.9)


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        ([], "local SGD H=4"),
        (["algorithm.outer=slowmo"], "local SGD H=4 + SlowMo (α=1, β=0.5)"),
        (
            ["algorithm.outer=slowmo", "algorithm.slow_lr=0.75", "algorithm.slow_momentum=0.2"],
            "local SGD H=4 + SlowMo (α=0.75, β=0.2)",
        ),
        (["algorithm.outer=nesterov"], "local SGD H=4 + outer Nesterov (η=0.7, μ=0.9)"),
        (
            ["algorithm.method=post_local_sgd", "algorithm.outer=nesterov", "algorithm.outer_every=3"],
            "post-local SGD H=4 + outer Nesterov (η=0.7, μ=0.9) every 3 averages",
        ),
        (["algorithm.method=allreduce"], "all-reduce SGD"),
    ],
)
def test_the_start_up_line_names_the_outer_step_and_its_settings(overrides: list[str], line: str) -> None:
    assert describe_method(load_config(None, overrides)) == line


def test_the_report_orders_and_labels_methods_as_before() -> None:
    assert collect.METHOD_ORDER == (
        "all-reduce",
        "local SGD",
        "post-local SGD",
        "SlowMo",
        "post-local SGD + SlowMo",
        "local SGD + outer Nesterov",
        "post-local SGD + outer Nesterov",
    )
    # A file from a version with an outer optimizer this one does not know keeps its name.
    assert collect.method_label("local_sgd", "adam") == "local SGD + adam"
    assert collect.method_label("allreduce", "none") == "all-reduce"


def test_the_schema_refuses_other_names_and_names_the_outer_optimizers() -> None:
    with pytest.raises(ConfigError, match=r"^algorithm\.outer: must be one of 'none' \| 'slowmo' \| 'nesterov'"):
        load_config(None, ["algorithm.outer=adam"])
    with pytest.raises(ConfigError, match=r"set algorithm\.outer to slowmo or nesterov$"):
        load_config(None, ["algorithm.outer_every=2"])
