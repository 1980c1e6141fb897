from __future__ import annotations

from pathlib import Path

import pytest

from hpc_localsgd.config import RunConfig, config_to_yaml, load_config
from hpc_localsgd.config.schema import CommConfig
from hpc_localsgd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_imagenet_recipe() -> None:
    cfg = load_config(None)
    assert (cfg.optim.lr_per_256, cfg.optim.warmup_epochs, cfg.optim.decay_epochs) == (0.1, 5.0, [30.0, 60.0, 80.0])
    assert (cfg.algorithm.slow_lr, cfg.algorithm.slow_momentum) == (1.0, 0.5)
    assert (cfg.algorithm.outer_lr, cfg.algorithm.outer_momentum) == (0.7, 0.9)


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "algorithm:\n  method: local_sgd\n  sync_period: 4\ndata:\n  name: synthetic\n")
    cfg = load_config(
        path,
        [
            "algorithm.sync_period=16",
            "algorithm.outer=slowmo",
            "optim.decay_epochs=[1, 2]",
            "data.synthetic.shape=[8]",
            "train.max_steps=null",
        ],
    )
    assert cfg.algorithm.sync_period == 16 and cfg.algorithm.outer == "slowmo"
    assert cfg.optim.decay_epochs == [1.0, 2.0] and cfg.data.synthetic.shape == [8]
    assert cfg.train.max_steps is None
    # The resolved config round-trips through YAML.
    again = write(tmp_path, config_to_yaml(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        ("algorithm:\n  sync_perod: 4\n", [], "algorithm.sync_perod: unknown key; did you mean 'sync_period'?"),
        ("colour: red\n", [], "colour: unknown key"),
        ("algorithm:\n  sync_period: four\n", [], "algorithm.sync_period: expected an integer, got 'four'"),
        ("algorithm:\n  sync_period: 2.5\n", [], "algorithm.sync_period: expected an integer, got 2.5"),
        ("train:\n  epochs: true\n", [], "train.epochs: expected a number, got True"),
        ("", ["algorithm.sync_period=0"], "algorithm.sync_period: must be >= 1, got 0"),
        ("", ["optim.lr_per_256=0"], "optim.lr_per_256: must be > 0, got 0.0"),
        ("", ["optim.lr_per_256=-0.1"], "optim.lr_per_256: must be > 0, got -0.1"),
        ("", ["algorithm.slow_momentum=1"], "algorithm.slow_momentum: must be in [0, 1), got 1.0"),
        ("", ["algorithm.slow_momentum=-0.5"], "algorithm.slow_momentum: must be in [0, 1), got -0.5"),
        ("", ["optim.lr_per_256=.nan"], "optim.lr_per_256: must be > 0, got nan"),
        ("", ["optim.decay_factor=1.5"], "optim.decay_factor: must be in (0, 1], got 1.5"),
        ("", ["checkpoint.keep=0"], "checkpoint.keep: must be >= 1, got 0"),
        (
            "",
            ["algorithm.method=gossip"],
            "algorithm.method: must be one of 'allreduce' | 'local_sgd' | 'post_local_sgd'",
        ),
        ("", ["comm.backend=nccl"], "comm.backend: must be one of 'auto' | 'horovod' | 'mpi' | 'torch' | 'single'"),
        ("", ["comm.sync_thread=sometimes"], "comm.sync_thread: expected true or false or 'auto', got 'sometimes'"),
        ("", ["algorithm.method=allreduce", "algorithm.outer=slowmo"], "algorithm.outer: an outer optimizer needs"),
        ("", ["algorithm.switch_step=10"], "algorithm.switch_step: only applies to method 'post_local_sgd'"),
        ("", ["data.name=cifar10"], "data.path: is required for dataset 'cifar10'"),
        ("model: [1, 2]\n", [], "model: expected a mapping, got [1, 2]"),
        ("- 1\n", [], "expected a mapping of sections at the top level"),
        ("algorithm: {sync_period: 4\n", [], "at line"),
        ("", ["sync_period"], "--set 'sync_period': expected key=value"),
        ("", ["algorithm.sync_period.x=1"], "algorithm.sync_period: expected an integer, got {'x': 1}"),
        ("algorithm: 3\n", ["algorithm.sync_period=2"], "--set algorithm.sync_period: 'algorithm' is not a section"),
        # A setting of another inner optimizer than the one named: refused, not silently ignored.
        (
            "",
            ["optim.name=adamw", "optim.momentum=0.9"],
            "optim.momentum: is not a setting of adamw (its own: beta1, beta2, eps); remove it",
        ),
        ("", ["optim.nesterov=true", "optim.momentum=0"], "optim.nesterov: needs momentum > 0"),
        ("", ["optim.beta2=0.99"], "optim.beta2: is not a setting of sgd (its own: momentum, nesterov); remove it"),
        ("", ["optim.name=adamw", "optim.muon_lr_ratio=5"], "optim.muon_lr_ratio: is not a setting of adamw"),
        ("", ["optim.name=muon", "optim.nesterov=true"], "optim.nesterov: is not a setting of muon"),
        # A language model learns token data, and only it does.
        ("", ["model.name=gpt"], "data.name: gpt cannot learn digits: a language model (model.name gpt) learns"),
        ("", ["data.name=text"], "model.name: smallcnn cannot learn text: a language model (model.name gpt)"),
        (
            "",
            ["model.name=gpt", "data.name=text", "model.gpt.vocab=100"],
            "model.gpt.vocab: byte-level text (data.name text) has 256 token ids; 100 is too few",
        ),
        ("", ["model.name=gpt", "model.gpt.dim=100", "model.gpt.heads=3"], "model.gpt.dim: 100 is not a multiple"),
        ("", ["data.name=tokens", "model.name=gpt"], "data.path: is required for dataset 'tokens'"),
        # Going on without a lost worker: what it covers, refused in one line elsewhere.
        (
            "",
            ["comm.on_worker_loss=continue", "comm.backend=mpi", "algorithm.method=local_sgd"],
            "comm.on_worker_loss: continue needs comm.backend=torch: the mpi backend cannot go on without a rank",
        ),
        (
            "",
            ["comm.on_worker_loss=continue", "comm.backend=horovod", "algorithm.method=local_sgd"],
            "comm.on_worker_loss: continue needs comm.backend=torch: the horovod backend cannot go on without a rank",
        ),
        (
            "",
            ["comm.on_worker_loss=continue", "comm.backend=torch", "algorithm.method=allreduce"],
            "comm.on_worker_loss: continue needs local steps (method local_sgd or post_local_sgd)",
        ),
        (
            "",
            [
                "comm.on_worker_loss=continue",
                "algorithm.method=local_sgd",
                "algorithm.sync_delay=1",
                "comm.sync_compression=int8",
            ],
            "comm.on_worker_loss: continue works with the blocking average on the CPU; not yet with "
            "algorithm.sync_delay, comm.sync_compression; use stop",
        ),
        ("", ["comm.on_worker_loss=maybe"], "comm.on_worker_loss: must be one of 'stop' | 'continue', got 'maybe'"),
        ("", ["comm.worker_timeout_seconds=0.5"], "comm.worker_timeout_seconds: must be >= 1"),
        (
            "",
            ["comm.on_worker_loss=continue", "algorithm.method=local_sgd", "comm.stall_timeout_seconds=600"],
            "comm.stall_timeout_seconds: with comm.on_worker_loss=continue a silent worker is dropped after",
        ),
    ],
)
def test_bad_input_names_the_problem(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "path", sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "sweeps"), ids=lambda p: p.name
)
def test_shipped_configs_are_valid(path: Path) -> None:
    assert isinstance(load_config(path), RunConfig)


@pytest.mark.parametrize(
    ("setting", "spare", "uses"),
    [("auto", 0, False), ("auto", 1, True), ("auto", 7, True), (True, 0, True), (False, 3, False)],
)
def test_the_sync_thread_runs_where_a_rank_has_a_core_to_spare_unless_told(setting, spare: int, uses: bool) -> None:
    assert CommConfig(sync_thread=setting).uses_sync_thread(spare) is uses
