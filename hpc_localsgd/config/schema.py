"""The typed schema of a run's configuration.

One nested dataclass per stage of the data flow. YAML gives values, ``--set key=value``
overrides them, and :func:`hpc_localsgd.config.load.resolve` checks every key, type and
range before anything runs, so that a bad value fails on every rank with one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..errors import ConfigError

Method = Literal["allreduce", "local_sgd", "post_local_sgd"]
OuterOptimizer = Literal["none", "slowmo", "nesterov"]
BuffersPolicy = Literal["keep", "average", "reset"]
Backend = Literal["auto", "horovod", "mpi", "torch", "single", "simulated"]
DatasetName = Literal["digits", "synthetic", "cifar10", "imagenet"]
LRSchedule = Literal["constant", "step", "cosine"]


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class SyntheticConfig:
    """A learnable synthetic task: inputs ~ N(0, 1), labels = argmax of a fixed random linear teacher."""

    train_samples: int = 4096
    test_samples: int = 1024
    shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    num_classes: int = 10
    # Label noise keeps the task from being trivially separable (0 = clean labels).
    label_noise: float = 0.0

    def validate(self, key: str) -> None:
        _check(self.train_samples >= 1, f"{key}.train_samples", f"must be >= 1, got {self.train_samples}")
        _check(self.test_samples >= 1, f"{key}.test_samples", f"must be >= 1, got {self.test_samples}")
        _check(len(self.shape) in (1, 3) and all(s >= 1 for s in self.shape), f"{key}.shape",
               f"must be [features] or [channels, height, width] of positive sizes, got {self.shape}")
        _check(self.num_classes >= 2, f"{key}.num_classes", f"must be >= 2, got {self.num_classes}")
        _check(0.0 <= self.label_noise < 1.0, f"{key}.label_noise", f"must be in [0, 1), got {self.label_noise}")


@dataclass
class DataConfig:
    name: DatasetName = "digits"
    # Folder for cifar10 (holding data_batch_1..5 and test_batch, or their cifar-10-batches-py
    # parent) and imagenet (holding train/ and val/ ImageFolder trees). Unused otherwise.
    path: Optional[str] = None
    # Per-worker batch: the global batch is batch_size × world size.
    batch_size: int = 32
    eval_batch_size: int = 256
    # DataLoader worker processes for file-backed datasets (imagenet); in-memory sets use none.
    num_workers: int = 4
    # Random crop + horizontal flip for cifar10 / imagenet training images.
    augment: bool = True
    # Side of the square crops fed to the model for imagenet.
    image_size: int = 224
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self, key: str = "data") -> None:
        _check(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size >= 1, f"{key}.eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _check(self.image_size >= 8, f"{key}.image_size", f"must be >= 8, got {self.image_size}")
        _check(self.num_workers >= 0, f"{key}.num_workers", f"must be >= 0, got {self.num_workers}")
        if self.name in ("cifar10", "imagenet"):
            _check(self.path is not None, f"{key}.path", f"is required for dataset {self.name!r}")
        self.synthetic.validate(f"{key}.synthetic")


@dataclass
class ModelConfig:
    # A torchvision classification model by name (resnet18, resnet50, ...), or "smallcnn" / "mlp".
    name: str = "smallcnn"
    # Replace the ImageNet stem (7×7 stride-2 conv + max-pool) by a 3×3 stride-1 conv, for 32×32 inputs.
    cifar_stem: bool = False
    # Width of the small models.
    width: int = 32

    def validate(self, key: str = "model") -> None:
        _check(self.width >= 1, f"{key}.width", f"must be >= 1, got {self.width}")


@dataclass
class OptimConfig:
    """SGD with momentum and weight decay; LR per 256 samples, scaled linearly with the global batch
    (Goyal et al. 2017). Defaults are the ImageNet ResNet-50 recipe."""

    lr_per_256: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    warmup_epochs: float = 5.0
    schedule: LRSchedule = "step"
    decay_epochs: list[float] = field(default_factory=lambda: [30.0, 60.0, 80.0])
    decay_factor: float = 0.1

    def validate(self, key: str = "optim") -> None:
        _check(self.lr_per_256 > 0, f"{key}.lr_per_256", f"must be > 0, got {self.lr_per_256}")
        _check(0.0 <= self.momentum < 1.0, f"{key}.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(not self.nesterov or self.momentum > 0, f"{key}.nesterov", "needs momentum > 0")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.warmup_epochs >= 0, f"{key}.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(0 < self.decay_factor <= 1, f"{key}.decay_factor", f"must be in (0, 1], got {self.decay_factor}")
        _check(all(e > 0 for e in self.decay_epochs) and self.decay_epochs == sorted(self.decay_epochs),
               f"{key}.decay_epochs", f"must be increasing positive epochs, got {self.decay_epochs}")


@dataclass
class AlgorithmConfig:
    """One averaging engine; the study's methods are settings of it.

    allreduce       gradients averaged every step (synchronous SGD, the baseline)
    local_sgd       sync_period local steps, then the model is averaged
    post_local_sgd  allreduce until the switch, local_sgd after (Lin et al. 2020)
    The outer optimizer acts on the averaged model at each sync: none (plain average), slowmo
    (Wang et al. 2020) or nesterov (DiLoCo, Douillard et al. 2023).
    """

    method: Method = "local_sgd"
    sync_period: int = 4
    # Post-local SGD switch point, as a step or an epoch (at most one); neither = first LR decay.
    switch_step: Optional[int] = None
    switch_epoch: Optional[float] = None
    outer: OuterOptimizer = "none"
    slow_lr: float = 1.0
    slow_momentum: float = 0.5
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    # Base optimizer momentum buffers at a sync: kept local, averaged (2× bytes), or reset to zero.
    momentum_buffers: BuffersPolicy = "keep"
    # BatchNorm running statistics at a sync: averaged, or kept local to each rank.
    average_bn_buffers: bool = True

    def validate(self, key: str = "algorithm") -> None:
        _check(self.sync_period >= 1, f"{key}.sync_period", f"must be >= 1, got {self.sync_period}")
        _check(self.switch_step is None or self.switch_epoch is None, f"{key}.switch_step",
               "give switch_step or switch_epoch, not both")
        _check(self.switch_step is None or self.switch_step >= 0, f"{key}.switch_step",
               f"must be >= 0, got {self.switch_step}")
        _check(self.switch_epoch is None or self.switch_epoch >= 0, f"{key}.switch_epoch",
               f"must be >= 0, got {self.switch_epoch}")
        if self.method != "post_local_sgd":
            _check(self.switch_step is None and self.switch_epoch is None, f"{key}.switch_step",
                   "only applies to method 'post_local_sgd'")
        if self.method == "allreduce":
            _check(self.outer == "none", f"{key}.outer",
                   "an outer optimizer needs method 'local_sgd' or 'post_local_sgd'")
            _check(self.momentum_buffers == "keep", f"{key}.momentum_buffers",
                   "applies to model averaging; method 'allreduce' keeps replicas identical")
        _check(self.slow_lr > 0, f"{key}.slow_lr", f"must be > 0, got {self.slow_lr}")
        _check(0.0 <= self.slow_momentum < 1.0, f"{key}.slow_momentum", f"must be in [0, 1), got {self.slow_momentum}")
        _check(self.outer_lr > 0, f"{key}.outer_lr", f"must be > 0, got {self.outer_lr}")
        _check(0.0 <= self.outer_momentum < 1.0, f"{key}.outer_momentum",
               f"must be in [0, 1), got {self.outer_momentum}")


@dataclass
class CommConfig:
    backend: Backend = "auto"
    # Gradient buckets for the synchronous phase: allreduces start during backward once a bucket fills.
    bucket_mb: float = 25.0
    # backend "simulated": this many workers run in one process (no launcher), their models
    # stacked and computed as one batch; same engine, same numbers as that many MPI ranks.
    simulated_workers: int = 0
    # Horovod's background thread coordinates the ranks once per cycle. None: Horovod's default
    # (or HOROVOD_CYCLE_TIME) for all-reduce SGD, 10 ms for local and post-local SGD, whose ranks
    # have nothing to coordinate between syncs (docs/BENCHMARKS.md, target 3).
    horovod_cycle_time_ms: Optional[float] = None

    def validate(self, key: str = "comm") -> None:
        _check(self.bucket_mb > 0, f"{key}.bucket_mb", f"must be > 0, got {self.bucket_mb}")
        _check(self.horovod_cycle_time_ms is None or self.horovod_cycle_time_ms > 0, f"{key}.horovod_cycle_time_ms",
               f"must be > 0, got {self.horovod_cycle_time_ms}")
        if self.backend == "simulated":
            _check(self.simulated_workers >= 1, f"{key}.simulated_workers",
                   f"must be >= 1 with {key}.backend=simulated, got {self.simulated_workers}")
        else:
            _check(self.simulated_workers == 0, f"{key}.simulated_workers",
                   f"is only used with {key}.backend=simulated (backend is {self.backend!r}); remove it")


@dataclass
class TrainConfig:
    epochs: float = 90.0
    # Stop after this many optimizer steps even if epochs are not done (None: run all epochs).
    max_steps: Optional[int] = None
    eval_every_epochs: float = 1.0
    log_every_steps: int = 50
    # "auto": cuda:<local rank> when GPUs exist, else the CPU.
    device: str = "auto"
    # torch intra-op threads per rank; 0 = OMP_NUM_THREADS, SLURM_CPUS_PER_TASK, or cores ÷ ranks on the node.
    threads: int = 0

    def validate(self, key: str = "train") -> None:
        _check(self.epochs > 0, f"{key}.epochs", f"must be > 0, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, f"{key}.max_steps",
               f"must be >= 1, got {self.max_steps}")
        _check(self.eval_every_epochs > 0, f"{key}.eval_every_epochs", f"must be > 0, got {self.eval_every_epochs}")
        _check(self.log_every_steps >= 1, f"{key}.log_every_steps", f"must be >= 1, got {self.log_every_steps}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), f"{key}.device",
               f"must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        _check(self.threads >= 0, f"{key}.threads", f"must be >= 0, got {self.threads}")


@dataclass
class CheckpointConfig:
    """When checkpoints are written to RUN_DIR/checkpoints/ (see hpc_localsgd/io/checkpoint.py)."""

    # Every this many optimizer steps (0: off).
    every_steps: int = 0
    # Every this many minutes of training, as measured by rank 0 (0: off).
    every_minutes: float = 0.0
    # At the end of training.
    at_end: bool = True
    # How many checkpoints to keep; older ones are deleted once a newer one is complete.
    keep: int = 3
    # Ranks agree on time- and signal-triggered checkpoints (and on stopping) every this many
    # steps, through one tiny allreduce: a step-by-step poll would add a latency-bound
    # collective to every local SGD step.
    poll_every_steps: int = 10
    # After the checkpoint that SIGUSR1 triggers (Slurm's --signal=USR1@<seconds> before the time
    # limit), rank 0 runs `scontrol requeue $SLURM_JOB_ID` so that the job continues by itself.
    # SIGTERM (scancel, preemption) checkpoints and stops without requeueing.
    requeue_on_usr1: bool = True

    def validate(self, key: str = "checkpoint") -> None:
        _check(self.every_steps >= 0, f"{key}.every_steps", f"must be >= 0, got {self.every_steps}")
        _check(self.every_minutes >= 0, f"{key}.every_minutes", f"must be >= 0, got {self.every_minutes}")
        _check(self.keep >= 1, f"{key}.keep", f"must be >= 1, got {self.keep}")
        _check(self.poll_every_steps >= 1, f"{key}.poll_every_steps", f"must be >= 1, got {self.poll_every_steps}")


@dataclass
class OutputConfig:
    # The run directory on the shared filesystem: metrics.h5, config.yaml, checkpoints/.
    run_dir: str = "runs/default"
    # Metrics rows are buffered and appended by opening, writing and closing metrics.h5, so
    # the file is complete and readable (h5py, h5dump) between flushes while the run goes on.
    metrics_flush_seconds: float = 30.0
    # HDF5 file locking fails or hangs on many parallel filesystems (Lustre, GPFS, NFS), and
    # every file here has a single writer at a time, so it is off unless asked for.
    hdf5_file_locking: bool = False

    def validate(self, key: str = "output") -> None:
        _check(bool(self.run_dir), f"{key}.run_dir", "must not be empty")
        _check(self.metrics_flush_seconds >= 0, f"{key}.metrics_flush_seconds",
               f"must be >= 0, got {self.metrics_flush_seconds}")


@dataclass
class RunConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> None:
        for name in ("model", "data", "optim", "algorithm", "comm", "train", "checkpoint", "output"):
            getattr(self, name).validate(name)
        if self.comm.backend == "simulated":
            # A simulation is one process that runs minutes: it writes no checkpoints.
            _check(self.checkpoint.every_steps == 0 and self.checkpoint.every_minutes == 0, "checkpoint",
                   "comm.backend=simulated writes no checkpoints; set checkpoint.every_steps=0 and "
                   "checkpoint.every_minutes=0")
