from __future__ import annotations

import math

import pytest

from hpc_localsgd.config.schema import OptimConfig
from hpc_localsgd.train.lr import LRSchedule


def test_goyal_recipe_linear_scaling_warmup_and_steps() -> None:
    # 8192 global batch, 100 steps per epoch: peak = 0.1 × 8192 / 256 = 3.2.
    s = LRSchedule.from_config(OptimConfig(), global_batch=8192, steps_per_epoch=100, total_steps=9000)
    assert s.peak == pytest.approx(3.2)
    assert s.warmup_steps == 500
    assert s.at(0) == pytest.approx(3.2 / 500)
    assert s.at(249) == pytest.approx(3.2 * 250 / 500)
    assert s.at(499) == pytest.approx(3.2)
    assert s.at(2999) == pytest.approx(3.2)
    assert s.at(3000) == pytest.approx(0.32)
    assert s.at(6000) == pytest.approx(0.032)
    assert s.at(8000) == pytest.approx(0.0032)
    assert s.first_decay_step == 3000


def test_cosine_and_constant() -> None:
    cfg = OptimConfig(lr_per_256=0.256, warmup_epochs=0, schedule="cosine")
    s = LRSchedule.from_config(cfg, global_batch=256, steps_per_epoch=10, total_steps=100)
    assert s.at(0) == pytest.approx(0.256)
    assert s.at(50) == pytest.approx(0.128)
    assert s.at(99) == pytest.approx(0.5 * 0.256 * (1 + math.cos(math.pi * 0.99)))
    assert s.first_decay_step is None
    const = LRSchedule.from_config(OptimConfig(warmup_epochs=0, schedule="constant"), 512, 10, 100)
    assert {const.at(i) for i in range(100)} == {0.2}


def test_cosine_and_linear_decay_to_a_floor_after_warmup_steps() -> None:
    """Language-model recipes: warm-up given in steps, then cosine or linear decay to min_lr_ratio × peak."""
    base = {"lr_per_256": 0.256, "warmup_epochs": 0, "warmup_steps": 10, "min_lr_ratio": 0.1}
    cosine = LRSchedule.from_config(OptimConfig(schedule="cosine", **base), 256, 1000, 110)
    linear = LRSchedule.from_config(OptimConfig(schedule="linear", **base), 256, 1000, 110)
    for s in (cosine, linear):
        assert s.warmup_steps == 10 and s.at(0) == pytest.approx(0.0256) and s.at(9) == pytest.approx(0.256)
        assert s.at(10) == pytest.approx(0.256) and s.at(110) == pytest.approx(0.0256) == s.at(500)
    # Halfway through the decay (step 60 of 10..110): both at the middle of peak and floor.
    assert cosine.at(60) == pytest.approx(0.1408) and linear.at(60) == pytest.approx(0.1408)
    # A quarter through: linear at 3/4 of the way from the floor, cosine at (1 + cos(π/4))/2 of it.
    assert linear.at(35) == pytest.approx(0.0256 + 0.2304 * 0.75)
    assert cosine.at(35) == pytest.approx(0.0256 + 0.2304 * (1 + math.cos(math.pi / 4)) / 2)


def test_cosine_without_a_floor_keeps_its_bits() -> None:
    s = LRSchedule.from_config(OptimConfig(lr_per_256=0.3, warmup_epochs=1, schedule="cosine"), 512, 7, 90)
    for step in range(7, 90):
        assert s.at(step) == 0.5 * s.peak * (1.0 + math.cos(math.pi * min(step - 7, 83) / 83))


def test_warmup_in_steps_and_epochs_together_is_refused() -> None:
    from hpc_localsgd.config import load_config
    from hpc_localsgd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"optim.warmup_steps: give warm-up in steps or in epochs, not both"):
        load_config(None, ["optim.warmup_steps=100"])
