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
