"""The typed schema of a run's configuration.

One nested dataclass per stage of the data flow. YAML gives values, ``--set key=value``
overrides them, and :func:`hpc_localsgd.config.load.load_config` checks every key, type and
range before anything runs, so that a bad value fails on every rank with one line. Each field
states its meaning and range where it is declared (:func:`.fields.setting`); ``hpc-localsgd
train --help-config`` prints them. ``validate()`` checks the declared ranges, then the rules
that involve several fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..errors import ConfigError
from .fields import check_declared, section, setting

Method = Literal["allreduce", "local_sgd", "post_local_sgd"]
OuterMethod = Literal["none", "slowmo", "nesterov"]
OptimizerStatePolicy = Literal["keep", "average", "reset"]
InnerOptimizerName = Literal["sgd", "adamw", "muon"]
Backend = Literal["auto", "horovod", "mpi", "torch", "single", "simulated"]
DatasetName = Literal["digits", "synthetic", "mnist1d", "cifar10", "imagenet", "tokens", "text"]
TokenDtype = Literal["uint16", "uint32"]
# Datasets of token sequences: a language model (model.name: gpt) learns them, and only them.
LANGUAGE_DATA = ("tokens", "text")
LRScheduleName = Literal["constant", "step", "cosine", "linear"]
Precision = Literal["fp32", "bf16", "fp16"]
SyncCompression = Literal["none", "bf16", "fp16", "int8"]
WorkerLoss = Literal["stop", "continue"]
GradientCompression = Literal["none", "bf16", "fp16"]


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class OuterSpec:
    """An outer optimizer as the configuration, the start-up line and the report know it.

    Its maths is a class of :mod:`hpc_localsgd.algorithms.outer` that declares this spec and is built
    from its settings. The spec is plain data, kept here, so that the configuration (below the
    algorithms) and the report (which imports no torch) read it without importing the maths.

    name      the value of ``algorithm.outer``
    title     how the start-up line and the report name it; empty for the plain average, which adds nothing
    settings  the ``algorithm`` fields it reads, each with its symbol in the formula, in the order its
              class's constructor takes them
    alone     on plain local SGD the report names it by its title alone, as its paper does ("SlowMo")
    """

    name: OuterMethod
    title: str = ""
    settings: tuple[tuple[str, str], ...] = ()
    alone: bool = False

    def describe(self, algorithm: AlgorithmConfig) -> str:
        """What it adds to the method on the start-up line: `` + SlowMo (α=1, β=0.5)``."""
        if not self.title:
            return ""
        values = ", ".join(f"{symbol}={getattr(algorithm, field):g}" for field, symbol in self.settings)
        return f" + {self.title} ({values})"

    def label(self, method: str, base: str) -> str:
        """The report's name for ``method`` (which the report calls ``base``) with this outer step."""
        if not self.title:
            return base
        return self.title if self.alone and method == "local_sgd" else f"{base} + {self.title}"


# Every outer optimizer, in the order the report lists them. ``OuterMethod`` names the same ones for
# the loader and the type checker: tests/unit/test_outer_registry.py checks that they, these specs
# and the classes of algorithms/outer.py agree.
OUTER_METHODS: dict[str, OuterSpec] = {
    spec.name: spec
    for spec in (
        OuterSpec("none"),
        OuterSpec("slowmo", "SlowMo", (("slow_lr", "α"), ("slow_momentum", "β")), alone=True),
        OuterSpec("nesterov", "outer Nesterov", (("outer_lr", "η"), ("outer_momentum", "μ"))),
    )
}


@dataclass
class SyntheticConfig:
    """A learnable synthetic task: inputs ~ N(0, 1), labels = argmax of a fixed random linear teacher."""

    train_samples: int = setting(4096, "Samples in the synthetic training set.", range=">= 1, <= 1e9")
    test_samples: int = setting(1024, "Samples in the synthetic test set.", range=">= 1, <= 1e9")
    shape: list[int] = setting(
        [3, 32, 32],
        "Shape of one input: [features] for an MLP, or [channels, height, width] for an image model.",
        range="<= 65536",
        rule="[features] or [channels, height, width] of positive sizes",
    )
    num_classes: int = setting(10, "Classes of the teacher's labels (outputs of the model).", range=">= 2, <= 1e6")
    label_noise: float = setting(
        0.0,
        "Share of training labels replaced by a random class, so that the task "
        "is not trivially separable (0: clean labels).",
        range="[0, 1)",
    )

    def validate(self, key: str) -> None:
        check_declared(self, key)
        _check(
            len(self.shape) in (1, 3) and all(s >= 1 for s in self.shape),
            f"{key}.shape",
            f"must be [features] or [channels, height, width] of positive sizes, got {self.shape}",
        )


@dataclass
class Mnist1dConfig:
    """MNIST-1D (Greydanus & Kobak 2024): 1-D sequences of 40 values, 10 classes, generated offline."""

    train_samples: int = setting(
        4000, "Training sequences (the package's default split is 4000/1000).", range=">= 1, <= 10000000"
    )
    test_samples: int = setting(1000, "Test sequences.", range=">= 1, <= 10000000")
    seed: int = setting(
        42,
        "Seed the data is generated from (the package's default). The dataset's own, not the run's: "
        "runs of different seeds train and test on the same sequences.",
        range=">= 0, <= 4294967295",
    )

    def validate(self, key: str) -> None:
        check_declared(self, key)


@dataclass
class TextConfig:
    """Byte-level text (data.name: text): every byte a token, vocabulary 256, no tokenizer to download."""

    val_fraction: float = setting(
        0.05, "Share of the text held out for validation: its last bytes, after the training bytes.", range="(0, 0.5]"
    )
    max_bytes: int | None = setting(
        4_000_000,
        "Read at most this many bytes of the text, files taken in sorted order (null: all of it). Keeps the "
        "built-in corpus (data.path null: the Python standard library's source) the same size on every machine.",
        range=">= 1024, <= 1e12",
    )

    def validate(self, key: str) -> None:
        check_declared(self, key)


@dataclass
class TokensConfig:
    """Token files (data.name: tokens): ``train.bin`` and ``val.bin`` in data.path, flat arrays of token ids."""

    dtype: TokenDtype = setting(
        "uint16", "Type of the stored ids: uint16 (vocabularies up to 65536) or uint32 (larger ones)."
    )

    def validate(self, key: str) -> None:
        check_declared(self, key)


@dataclass
class DataConfig:
    """What the model learns from, and how it is batched."""

    name: DatasetName = setting(
        "digits",
        "The dataset: digits (scikit-learn's 8×8 digits, in memory), synthetic "
        "(see data.synthetic), mnist1d (generated offline, see data.mnist1d), cifar10 or imagenet (read "
        "from data.path); for language models (model.name: gpt) tokens (train.bin / val.bin in data.path, see "
        "data.tokens) or text (bytes of a file or folder in data.path; null: the Python standard library's "
        "source, see data.text).",
    )
    path: str | None = setting(
        None,
        "Folder for cifar10 (holding data_batch_1..5 and test_batch, or their "
        "cifar-10-batches-py parent) and imagenet (holding train/ and val/ "
        "ImageFolder trees), tokens (holding train.bin and val.bin) and text (a text file, or a folder whose "
        "files are read in sorted order; null: the Python standard library's source). Unused otherwise.",
        rule="required for cifar10, imagenet and tokens",
    )
    batch_size: int = setting(
        32,
        "Training samples per worker and step: the global batch is batch_size × world size.",
        range=">= 1, <= 1e6",
    )
    eval_batch_size: int = setting(
        256,
        "Test samples per forward pass during evaluation, on each rank (the "
        "test set is split across ranks); affects speed and memory, not results.",
        range=">= 1, <= 1e6",
    )
    eval_samples: int | None = setting(
        None,
        "Evaluate on the first this many test samples (windows of model.gpt.seq_len tokens for language data), "
        "the same ones at every evaluation (null: the whole test set).",
        range=">= 1, <= 1e12",
    )
    num_workers: int | Literal["auto"] = setting(
        "auto",
        "DataLoader worker processes per rank for file-backed datasets (imagenet), kept alive across epochs; "
        "auto: the rank's CPUs minus one for the training process, at most 8. In-memory sets use none.",
        range=">= 0, <= 1024",
    )
    augment: bool = setting(True, "Random crop and horizontal flip of cifar10 / imagenet training images.")
    image_size: int = setting(224, "Side of the square crops fed to the model for imagenet.", range=">= 8, <= 8192")
    synthetic: SyntheticConfig = section(SyntheticConfig, "The synthetic task (data.name: synthetic).")
    mnist1d: Mnist1dConfig = section(Mnist1dConfig, "MNIST-1D's size and seed (data.name: mnist1d).")
    text: TextConfig = section(TextConfig, "Byte-level text (data.name: text).")
    tokens: TokensConfig = section(TokensConfig, "Token files (data.name: tokens).")

    def validate(self, key: str = "data") -> None:
        check_declared(self, key)
        if self.name in ("cifar10", "imagenet", "tokens"):
            _check(self.path is not None, f"{key}.path", f"is required for dataset {self.name!r}")
        self.synthetic.validate(f"{key}.synthetic")
        self.mnist1d.validate(f"{key}.mnist1d")
        self.text.validate(f"{key}.text")
        self.tokens.validate(f"{key}.tokens")


@dataclass
class GptConfig:
    """A decoder-only transformer (model.name: gpt): pre-norm blocks, causal attention, tied embeddings."""

    layers: int = setting(4, "Transformer blocks.", range=">= 1, <= 1024")
    heads: int = setting(4, "Attention heads per block.", range=">= 1, <= 1024")
    dim: int = setting(
        128, "Width of the residual stream (embedding size).", range=">= 1, <= 65536", rule="a multiple of heads"
    )
    seq_len: int = setting(128, "Tokens per training window (the context length).", range=">= 1, <= 1e6")
    vocab: int = setting(
        256,
        "Token ids the model embeds and predicts: 256 for byte-level text; for token files at least the "
        "largest id + 1 (GPT-2's 50257, rounded up to 50304 for faster kernels, as nanoGPT does).",
        range=">= 2, <= 4294967296",
    )
    dropout: float = setting(0.0, "Dropout after attention, after each MLP and on the embeddings.", range="[0, 1)")

    def validate(self, key: str) -> None:
        check_declared(self, key)
        _check(self.dim % self.heads == 0, f"{key}.dim", f"{self.dim} is not a multiple of heads ({self.heads})")


@dataclass
class ModelConfig:
    """The network every worker trains."""

    name: str = setting(
        "smallcnn",
        "A torchvision classification model by name (resnet18, resnet50, ...), or "
        "smallcnn / mlp (the package's small models), resnet1d (a small 1-D ResNet for sequences: mnist1d), or "
        "gpt (a decoder-only transformer language model, see model.gpt; for data.name tokens or text).",
    )
    cifar_stem: bool = setting(
        False, "Replace the ImageNet stem (7×7 stride-2 conv + max-pool) by a 3×3 stride-1 conv, for 32×32 inputs."
    )
    width: int = setting(
        32,
        "Width (channels or hidden units) of the small models and resnet1d; unused by torchvision models.",
        range=">= 1, <= 65536",
    )
    gpt: GptConfig = section(GptConfig, "The transformer's shape (model.name: gpt).")

    def validate(self, key: str = "model") -> None:
        check_declared(self, key)
        self.gpt.validate(f"{key}.gpt")


@dataclass
class OptimConfig:
    """The inner optimizer every worker steps between syncs: SGD with momentum and weight decay, or AdamW;
    LR per 256 samples, scaled linearly with the global batch (Goyal et al. 2017). Defaults are the
    ImageNet ResNet-50 recipe."""

    name: InnerOptimizerName = setting(
        "sgd",
        "The inner optimizer: sgd (momentum, nesterov, weight_decay as L2), adamw (beta1, beta2, eps, "
        "weight_decay decoupled; Loshchilov and Hutter 2019) or muon (Muon for the hidden weight matrices, "
        "AdamW for the rest).",
    )
    lr_per_256: float = setting(
        0.1,
        "Peak learning rate per 256 samples: the peak LR is lr_per_256 × global batch / 256 (linear scaling).",
        range="> 0, <= 1e6",
    )
    lr: float | None = setting(
        None,
        "Peak learning rate as it is, whatever the global batch (language-model recipes give it so); "
        "null: from lr_per_256.",
        range="> 0, <= 1e6",
    )
    momentum: float | None = setting(
        None, "sgd: momentum of the inner optimizer on every worker (null: 0.9).", range="[0, 1)"
    )
    nesterov: bool = setting(False, "sgd: Nesterov momentum (needs momentum > 0).")
    weight_decay: float = setting(
        1e-4, "Weight decay of the inner optimizer: L2 for sgd, decoupled for adamw.", range="[0, 1]"
    )
    clip_grad_norm: float | None = setting(
        None,
        "Clip the gradient to this L2 norm before each inner step (null: never): each rank's own in a local "
        "step, the averaged one in a synchronous step.",
        range="> 0, <= 1e12",
    )
    beta1: float | None = setting(
        None, "adamw and muon's AdamW part: decay of the first-moment estimate (null: 0.9).", range="[0, 1)"
    )
    beta2: float | None = setting(
        None, "adamw and muon's AdamW part: decay of the second-moment estimate (null: 0.95).", range="[0, 1)"
    )
    eps: float | None = setting(
        None, "adamw and muon's AdamW part: added to the second moment's square root (null: 1e-8).", range="> 0, <= 1"
    )
    muon_lr_ratio: float | None = setting(
        None,
        "muon: the hidden matrices' learning rate over the schedule's, which AdamW uses (null: 10).",
        range="> 0, <= 1e6",
    )
    muon_momentum: float | None = setting(
        None, "muon: momentum of the hidden matrices, Nesterov form (null: 0.95).", range="[0, 1)"
    )
    warmup_epochs: float = setting(
        5.0,
        "Epochs of linear warm-up from peak / warm-up steps to the peak LR (0: start at the peak).",
        range=">= 0, <= 1e6",
    )
    warmup_steps: int | None = setting(
        None,
        "Optimizer steps of linear warm-up, as language-model recipes give it (null: warmup_epochs).",
        range=">= 0, <= 1e12",
        rule="not with warmup_epochs other than 0",
    )
    schedule: LRScheduleName = setting(
        "step",
        "LR after warm-up: constant; step (multiplied by decay_factor at "
        "each of decay_epochs); cosine or linear (down to min_lr_ratio × peak at the last step).",
    )
    min_lr_ratio: float = setting(
        0.0, "The floor cosine and linear decay end at, as a fraction of the peak LR.", range="[0, 1]"
    )
    decay_epochs: list[float] = setting(
        [30.0, 60.0, 80.0],
        "Epochs at which the step schedule decays the LR; the first one is also post-local SGD's default switch.",
        range="<= 1e6",
        rule="increasing, each > 0",
    )
    decay_factor: float = setting(0.1, "Factor the step schedule multiplies the LR by at each decay.", range="(0, 1]")

    # The settings each inner optimizer reads beside the shared ones: any other one given is a mistake
    # (AdamW's momentum is beta1), refused rather than silently ignored.
    OWN_SETTINGS: ClassVar[dict[str, tuple[str, ...]]] = {
        "sgd": ("momentum", "nesterov"),
        "adamw": ("beta1", "beta2", "eps"),
        "muon": ("beta1", "beta2", "eps", "muon_lr_ratio", "muon_momentum"),
    }
    # What a null optimizer setting means.
    DEFAULTS: ClassVar[dict[str, float]] = {
        "momentum": 0.9,
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-8,
        "muon_lr_ratio": 10.0,
        "muon_momentum": 0.95,
    }

    def value(self, name: str) -> float:
        """Optimizer setting ``name`` as the optimizer uses it: as given, or its default when null."""
        given = getattr(self, name)
        return float(self.DEFAULTS[name] if given is None else given)

    def validate(self, key: str = "optim") -> None:
        check_declared(self, key)
        own = self.OWN_SETTINGS[self.name]
        for name in sorted({n for names in self.OWN_SETTINGS.values() for n in names} - set(own)):
            given = getattr(self, name)
            _check(
                given is None or given is False,
                f"{key}.{name}",
                f"is not a setting of {self.name} (its own: {', '.join(own)}); remove it",
            )
        _check(not self.nesterov or self.value("momentum") > 0, f"{key}.nesterov", "needs momentum > 0")
        _check(
            self.warmup_steps is None or self.warmup_epochs == 0,
            f"{key}.warmup_steps",
            f"give warm-up in steps or in epochs, not both (warmup_epochs is {self.warmup_epochs:g}: set it to 0)",
        )
        _check(
            all(e > 0 for e in self.decay_epochs) and self.decay_epochs == sorted(self.decay_epochs),
            f"{key}.decay_epochs",
            f"must be increasing positive epochs, got {self.decay_epochs}",
        )


@dataclass
class LevelConfig:
    """An intermediate level of a hierarchy: the model averaged inside groups of ranks."""

    ranks: int | Literal["node"] = setting(
        "node",
        "Consecutive ranks per group: a number, or node (the ranks of one node).",
        range="<= 1e6",
        rule="larger than, and a multiple of, the level below; divides the world size",
    )
    sync_period: int = setting(
        1,
        "Local steps between two averagings inside the groups.",
        range=">= 1, <= 1e6",
        rule="larger than the level below's, smaller than algorithm.sync_period",
    )


@dataclass
class AlgorithmConfig:
    """One averaging engine; the study's methods are settings of it.

    allreduce       gradients averaged every step (synchronous SGD, the baseline)
    local_sgd       sync_period local steps, then the model is averaged
    post_local_sgd  allreduce until the switch, local_sgd after (Lin et al. 2020)
    The outer optimizer acts on the averaged model at each sync: none (plain average), slowmo
    (Wang et al. 2020) or nesterov (DiLoCo, Douillard et al. 2023).
    """

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"momentum_buffers": "optimizer_state"}

    method: Method = setting(
        "local_sgd",
        "allreduce (gradients averaged every step), local_sgd (models averaged "
        "every sync_period steps) or post_local_sgd (allreduce until the "
        "switch, local_sgd after).",
    )
    sync_period: int = setting(
        4, "Local steps between two model averagings (H) for local_sgd and post_local_sgd.", range=">= 1, <= 1e6"
    )
    switch_step: int | None = setting(
        None,
        "post_local_sgd: the optimizer step at which local SGD starts (null: see switch_epoch).",
        range=">= 0, <= 1e12",
        rule="not with switch_epoch; only for post_local_sgd",
    )
    switch_epoch: float | None = setting(
        None,
        "post_local_sgd: the epoch at which local SGD starts (null with switch_step null: the first LR decay).",
        range=">= 0, <= 1e6",
        rule="not with switch_step; only for post_local_sgd",
    )
    outer: OuterMethod = setting(
        "none",
        "The outer step on the averaged model at each sync: none (plain average), slowmo or nesterov.",
        rule="not with method allreduce",
    )
    slow_lr: float = setting(
        1.0, "SlowMo's slow learning rate α (1 with slow_momentum 0: plain average).", range="> 0, <= 100"
    )
    slow_momentum: float = setting(0.5, "SlowMo's slow momentum β.", range="[0, 1)")
    outer_lr: float = setting(
        0.7,
        "Outer Nesterov's learning rate η on the outer gradient x_prev − x̄ (1 with outer_momentum 0: plain average).",
        range="> 0, <= 100",
    )
    outer_momentum: float = setting(0.9, "Outer Nesterov's momentum μ.", range="[0, 1)")
    outer_every: int = setting(
        1,
        "The outer step (slowmo, nesterov) on every k-th model average only, as fairscale's SlowMo decouples "
        "its period from the averaging period: the model is averaged every sync_period steps, and the outer "
        "step runs every outer_every·sync_period steps on the model of outer_every averages ago (1: at every "
        "average).",
        range=">= 1, <= 1e6",
        rule="above 1 only with outer slowmo or nesterov",
    )
    sync_delay: int = setting(
        0,
        "Overlap (Streaming DiLoCo): each global sync's update x_prev − x is taken this many local steps before "
        "the sync step and averaged in the background while they run; at the sync step the outer step gives "
        "the new global model (0: a blocking sync, as before). At most sync_period / fragments. At sync_period "
        "itself (fragments 1) the next update is taken at the sync step, before that sync is applied: every "
        "step's progress reaches the global model one sync late (with sync_period 1: one-step-delayed "
        "averaging), and the update taken at the run's last sync step is applied at once.",
        range=">= 0, <= 1e6",
        rule="at most sync_period / fragments",
    )
    sync_mix: float = setting(
        0.0,
        "With sync_delay: after a delayed sync each rank continues from (1 − sync_mix)·x_global + "
        "sync_mix·x_local, keeping that share of the progress it made meanwhile (torchft's "
        "fragment_update_alpha; 0: the global model).",
        range="[0, 1]",
    )
    fragments: int = setting(
        1,
        "Split the flat parameters into this many contiguous fragments, each averaged every sync_period steps "
        "on its own staggered schedule (offset f·sync_period/fragments), so that each sync sends 1/fragments "
        "of the model (Streaming DiLoCo).",
        range=">= 1, <= 1e6",
        rule="divides sync_period",
    )
    optimizer_state: OptimizerStatePolicy = setting(
        "keep",
        "The inner optimizer's per-parameter state (SGD's momentum buffers) at a sync: kept local, averaged "
        "with the model (2× bytes for SGD), or reset to zero. Formerly momentum_buffers, still accepted.",
        rule="keep with method allreduce",
    )
    average_bn_buffers: bool = setting(
        True, "Average BatchNorm running statistics at a sync (false: each rank keeps its own)."
    )
    ranks_per_worker: int | Literal["node"] = setting(
        1,
        "Ranks that form one local-SGD worker: 1 (every rank is a worker), a number N (ranks 0..N-1, N..2N-1, ... "
        "average their gradients every step, as all-reduce SGD does) or node (the ranks of one node). Model "
        "averaging, the outer optimizer and the buffer policies then act between workers.",
        range="<= 1e6",
        rule=">= 1 and divides the world size; node: every node holds as many ranks",
    )
    levels: list[LevelConfig] = setting(
        [],
        "Intermediate levels between the worker and the whole world, smallest group first: each averages the "
        "model inside groups of `ranks` every `sync_period` steps; when several are due only the largest "
        "group averages. Example: [{ranks: node, sync_period: 4}] with ranks_per_worker 1.",
        rule="group sizes strictly growing, each dividing the next and the world size; periods growing",
    )

    def validate(self, key: str = "algorithm") -> None:
        _check(
            self.switch_step is None or self.switch_epoch is None,
            f"{key}.switch_step",
            "give switch_step or switch_epoch, not both",
        )
        check_declared(self, key)
        if self.method != "post_local_sgd":
            _check(
                self.switch_step is None and self.switch_epoch is None,
                f"{key}.switch_step",
                "only applies to method 'post_local_sgd'",
            )
        _check(
            self.ranks_per_worker == "node" or self.ranks_per_worker >= 1,
            f"{key}.ranks_per_worker",
            f"must be >= 1 or 'node', got {self.ranks_per_worker}",
        )
        for index, level in enumerate(self.levels):
            check_declared(level, f"{key}.levels[{index}]")
            _check(
                level.ranks == "node" or level.ranks >= 2,
                f"{key}.levels[{index}].ranks",
                f"must be >= 2 or 'node', got {level.ranks}",
            )
        _check(
            self.outer_every == 1 or self.outer != "none",
            f"{key}.outer_every",
            "applies to an outer optimizer: set algorithm.outer to "
            + " or ".join(name for name, spec in OUTER_METHODS.items() if spec.title),
        )
        streaming = self.sync_delay > 0 or self.fragments > 1
        _check(
            self.sync_period % self.fragments == 0,
            f"{key}.fragments",
            f"must divide sync_period ({self.sync_period}) for evenly staggered syncs, got {self.fragments}",
        )
        _check(
            self.sync_delay <= self.sync_period // self.fragments,
            f"{key}.sync_delay",
            f"must be at most sync_period / fragments ({self.sync_period // self.fragments}): a fragment has "
            f"one average in flight at a time, got {self.sync_delay}",
        )
        _check(self.sync_mix == 0 or self.sync_delay > 0, f"{key}.sync_mix", "applies with sync_delay > 0")
        if self.method == "allreduce":
            _check(not streaming, f"{key}.sync_delay", "applies to model averaging, not to method 'allreduce'")
            _check(not self.levels, f"{key}.levels", "apply to model averaging; method 'allreduce' averages every step")
            _check(
                self.outer == "none", f"{key}.outer", "an outer optimizer needs method 'local_sgd' or 'post_local_sgd'"
            )
            _check(
                self.optimizer_state == "keep",
                f"{key}.optimizer_state",
                "applies to model averaging; method 'allreduce' keeps replicas identical",
            )


@dataclass
class CommConfig:
    """How ranks communicate."""

    backend: Backend = setting(
        "auto",
        "The communication library: auto (single outside a launcher, torch under "
        "torchrun, else horovod when it imports, else mpi), horovod, mpi (mpi4py), "
        "torch (torch.distributed), single (one process) or simulated.",
    )
    bucket_mb: float = setting(
        25.0,
        "Gradient bucket size in MiB for the synchronous phase: allreduces start during backward once a bucket fills.",
        range="> 0, <= 1e5",
    )
    simulated_workers: int = setting(
        0,
        "backend simulated: this many workers run in one process (no launcher), "
        "their models stacked and computed as one batch; same engine, same numbers "
        "as that many MPI ranks.",
        range="<= 4096",
        rule=">= 1 with backend simulated, else 0",
    )
    sync_compression: SyncCompression = setting(
        "none",
        "How a global sync sends each rank's update since the last sync (x_prev − x, never the parameters): "
        "none (fp32), bf16 or fp16 (half the bytes), int8 (one byte an element plus a float32 scale per "
        "256-element block). Decoded and summed in fp32 on every rank.",
    )
    gradient_compression: GradientCompression = setting(
        "none",
        "How a synchronous step (all-reduce, post-local SGD before its switch) sends its gradients between "
        "all ranks: none (fp32), bf16 or fp16 (half the bytes, as Horovod's Compression.fp16, without error "
        "feedback; fp16 saturates at ±65504). Decoded and summed in fp32 on every rank, never in half "
        "precision on the wire. Gradients averaged inside a worker (worker groups) stay fp32.",
    )
    error_feedback: bool | Literal["auto"] = setting(
        "auto",
        "Carry each rank's compression error into its next sync (e ← Δ + e − Q(Δ + e)): nothing is lost, "
        "only delayed. auto: on for int8, off for bf16/fp16.",
    )
    sync_thread: bool | Literal["auto"] = setting(
        "auto",
        "With algorithm.sync_delay: encode each update (error feedback included), wait for its average and "
        "decode it on a thread of the rank's own beside the training step, which then only takes Δ, starts "
        "the collectives and applies x̄; the same results either way. It pays where the rank has a core its "
        "torch threads leave free, and only moves the work where it has none; auto: on where the rank's cores "
        "outnumber its torch threads (train.threads). CPU models.",
    )
    mpi_polling: bool | Literal["auto"] = setting(
        "auto",
        "mpi backend: run allgathers, all-to-alls and allreduces from 1 MiB on the communication thread as "
        "non-blocking calls tested every millisecond, which leaves the core to the step between tests rather "
        "than polling in a blocking call. auto: where Open MPI yields while idle (a fully subscribed node) and "
        "the collective's ranks are on more than one node. On one node the copies through shared memory are "
        "the transfer, and testing every millisecond only delays them (0.79x DDP's synchronous throughput "
        "polled, 0.98x blocking; docs/BENCHMARKS.md).",
    )
    horovod_cycle_time_ms: float | None = setting(
        None,
        "How often Horovod's background thread coordinates the ranks, in ms. null: Horovod's default (or "
        "HOROVOD_CYCLE_TIME), for every method (docs/BENCHMARKS.md, Horovod's cycle time).",
        range="> 0, <= 60000",
    )
    on_worker_loss: WorkerLoss = setting(
        "stop",
        "What the run does when a worker dies or stops answering: stop (the launcher ends every rank; resume "
        "from the latest checkpoint) or continue (backend torch on the CPU: the survivors agree on who is left at "
        "the next collective, drop every worker that lost a rank, redo among themselves what the loss cut short "
        "and go on; the lost worker's data shard is skipped; train --rejoin starts a replacement). For local and "
        "post-local SGD with the blocking average; rank 0 hosts the rendezvous store and its loss ends the run.",
    )
    worker_timeout_seconds: float = setting(
        10.0,
        "on_worker_loss continue: a worker whose heartbeat (posted every 0.5 s through the rendezvous store) is "
        "this old is lost; a recovery waits at most this long for a silent member.",
        range=">= 1, <= 86400",
    )
    stall_warn_seconds: float = setting(
        60.0,
        "How long a rank waits in one collective before the lowest waiting rank prints one warning naming the "
        "ranks that have not joined it and what their heartbeats last said (step, phase, how long ago). Every "
        "rank writes a heartbeat to RUN_DIR/heartbeats every min(5 s, this / 4). mpi, horovod and torch backends.",
        range="> 0, <= 1e6",
    )
    stall_timeout_seconds: float | None = setting(
        None,
        "How long a rank waits in one collective before every waiting rank stops with exit status 5, one "
        "error line naming the late ranks, no checkpoint of that state, and a Slurm requeue where "
        "checkpoint.requeue_on_usr1 is set. null: never (the ranks only warn, and wait). Must exceed "
        "stall_warn_seconds, and the longest wait a healthy run has (a checkpoint write, an evaluation).",
        range="> 0, <= 1e7",
        rule="> stall_warn_seconds",
    )

    @property
    def uses_error_feedback(self) -> bool:
        """``error_feedback`` resolved: auto is on for int8 only; no codec, no error."""
        if self.sync_compression == "none":
            return False
        return self.sync_compression == "int8" if self.error_feedback == "auto" else bool(self.error_feedback)

    @property
    def mpi_polling_choice(self) -> bool | None:
        """``mpi_polling`` as the mpi backend takes it: None for auto (it decides per communicator)."""
        return None if self.mpi_polling == "auto" else bool(self.mpi_polling)

    def uses_sync_thread(self, spare_cores: int) -> bool:
        """``sync_thread`` resolved for a rank with ``spare_cores`` cores beyond its torch threads."""
        return spare_cores > 0 if self.sync_thread == "auto" else bool(self.sync_thread)

    def validate(self, key: str = "comm") -> None:
        check_declared(self, key)
        if self.backend == "simulated":
            _check(
                self.simulated_workers >= 1,
                f"{key}.simulated_workers",
                f"must be >= 1 with {key}.backend=simulated, got {self.simulated_workers}",
            )
        else:
            _check(
                self.simulated_workers == 0,
                f"{key}.simulated_workers",
                f"is only used with {key}.backend=simulated (backend is {self.backend!r}); remove it",
            )
        if self.stall_timeout_seconds is not None:
            _check(
                self.stall_timeout_seconds > self.stall_warn_seconds,
                f"{key}.stall_timeout_seconds",
                f"must exceed {key}.stall_warn_seconds ({self.stall_warn_seconds:g}), "
                f"got {self.stall_timeout_seconds:g}",
            )


@dataclass
class TrainConfig:
    """How long to train, how often to evaluate and report, and where."""

    epochs: float = setting(
        90.0,
        "Length of the run in epochs (passes over the training set, split across the "
        "workers); a fraction is allowed. The LR schedule is laid out over it.",
        range="> 0, <= 1e6",
    )
    max_steps: int | None = setting(
        None,
        "Stop after this many optimizer steps even if epochs are not done (null: run all epochs).",
        range=">= 1, <= 1e12",
    )
    eval_every_epochs: float = setting(
        1.0,
        "Evaluate on the test set every this many epochs (rounded to whole steps), and at the end.",
        range="> 0, <= 1e6",
    )
    eval_every_steps: int | None = setting(
        None,
        "Evaluate every this many optimizer steps instead, as language-model recipes count (null: "
        "eval_every_epochs), and at the end.",
        range=">= 1, <= 1e12",
    )
    log_every_steps: int = setting(
        50,
        "Print a progress line (loss, accuracy, LR, speed) every this many optimizer steps, and at the last one.",
        range=">= 1, <= 1e12",
    )
    device: str = setting(
        "auto",
        "auto (cuda:<local rank> when GPUs exist, else the CPU), cpu, cuda or cuda:<N>.",
        rule="'auto', 'cpu' or 'cuda[:N]'",
    )
    threads: int = setting(
        0,
        "torch intra-op threads per rank; 0: OMP_NUM_THREADS, SLURM_CPUS_PER_TASK, or cores ÷ ranks on the node.",
        range=">= 0, <= 4096",
    )
    precision: Precision = setting(
        "fp32",
        "The forward pass and the loss under torch.autocast: fp32 (none), bf16 (what to pick on current GPUs; "
        "runs on CPUs too) or fp16 (with loss scaling: a rank whose gradients overflow skips its optimizer step, "
        "its sync schedule goes on). Parameters, gradients, optimizer state, averaging and checkpoints stay fp32.",
    )
    channels_last: bool | Literal["auto"] = setting(
        "auto",
        "Feed images to convolutional models in channels-last (NHWC) memory format, which tensor cores run "
        "fastest; auto: on for models with 2-D convolutions on CUDA, off on CPUs. The weights keep their flat "
        "storage, so checkpoints do not depend on it.",
    )
    compile: bool = setting(
        False,
        "Run the model's forward and backward through torch.compile (TorchInductor); the first steps pay "
        "the compilation. Not with comm.backend=simulated.",
    )

    def validate(self, key: str = "train") -> None:
        check_declared(self, key)
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"{key}.device",
            f"must be 'auto', 'cpu' or 'cuda', got {self.device!r}",
        )


@dataclass
class CheckpointConfig:
    """When checkpoints are written to RUN_DIR/checkpoints/ (see hpc_localsgd/io/checkpoint.py)."""

    every_steps: int = setting(0, "Write a checkpoint every this many optimizer steps (0: off).", range=">= 0, <= 1e12")
    every_minutes: float = setting(
        0.0,
        "Write a checkpoint every this many minutes of training, as measured by rank 0 (0: off).",
        range=">= 0, <= 1e6",
    )
    at_end: bool = setting(True, "Write a checkpoint at the end of training.")
    keep: int = setting(
        3, "How many checkpoints to keep; older ones are deleted once a newer one is complete.", range=">= 1, <= 1e6"
    )
    # A step-by-step poll would add a latency-bound collective to every local SGD step.
    poll_every_steps: int = setting(
        10,
        "Ranks agree on time- and signal-triggered checkpoints (and on stopping) "
        "every this many steps, through one tiny allreduce.",
        range=">= 1, <= 1e6",
    )
    requeue_on_usr1: bool = setting(
        True,
        "After the checkpoint that SIGUSR1 triggers (Slurm's "
        "--signal=USR1@<seconds> before the time limit), rank 0 runs `scontrol "
        "requeue $SLURM_JOB_ID` so that the job continues by itself. SIGTERM "
        "(scancel, preemption) checkpoints and stops without requeueing.",
    )

    def validate(self, key: str = "checkpoint") -> None:
        check_declared(self, key)


@dataclass
class OutputConfig:
    """Where a run writes."""

    run_dir: str = setting(
        "runs/default",
        "The run directory on the shared filesystem: metrics.h5, config.yaml, checkpoints/.",
        rule="not empty",
    )
    metrics_flush_seconds: float = setting(
        30.0,
        "Metrics rows are buffered and appended to metrics.h5 (opened, "
        "written, closed) every this many seconds, so the file is complete "
        "and readable (h5py, h5dump) while the run goes on.",
        range=">= 0, <= 1e6",
    )
    # Every file here has a single writer at a time, so locking buys nothing.
    hdf5_file_locking: bool = setting(
        False,
        "HDF5 file locking; it fails or hangs on many parallel filesystems "
        "(Lustre, GPFS, NFS), so it is off unless asked for.",
    )

    def validate(self, key: str = "output") -> None:
        _check(bool(self.run_dir), f"{key}.run_dir", "must not be empty")
        check_declared(self, key)


@dataclass
class RunConfig:
    """Everything one run uses; its resolved form is written to RUN_DIR/config.yaml."""

    seed: int = setting(
        0,
        "Seeds the model's initialisation, the data order, augmentation and synthetic data; the "
        "same seed and world size give the same run.",
        range=">= 0, <= 4294967295",
    )
    model: ModelConfig = section(ModelConfig, "The network.")
    data: DataConfig = section(DataConfig, "The dataset and batches.")
    optim: OptimConfig = section(OptimConfig, "The base optimizer and LR schedule.")
    algorithm: AlgorithmConfig = section(AlgorithmConfig, "The averaging method and outer optimizer.")
    comm: CommConfig = section(CommConfig, "The communication backend.")
    train: TrainConfig = section(TrainConfig, "Length, evaluation, logging, device.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "When checkpoints are written.")
    output: OutputConfig = section(OutputConfig, "Where the run writes.")

    def _check_continue(self) -> None:
        """What ``comm.on_worker_loss: continue`` covers: a torch.distributed world (Open MPI 4 has no
        fault-tolerant MPI, so neither mpi4py nor Horovod survives a lost rank) with local steps between
        blocking global averages."""
        key, comm, a = "comm.on_worker_loss", self.comm, self.algorithm
        _check(
            comm.stall_timeout_seconds is None,
            "comm.stall_timeout_seconds",
            "with comm.on_worker_loss=continue a silent worker is dropped after comm.worker_timeout_seconds and "
            "the others go on; remove the stall timeout",
        )
        _check(
            comm.backend in ("auto", "torch"),
            key,
            f"continue needs comm.backend=torch: the {comm.backend} backend cannot go on without a rank "
            "(MPI here has no fault tolerance); use stop",
        )
        _check(
            a.method != "allreduce",
            key,
            "continue needs local steps (method local_sgd or post_local_sgd): all-reduce SGD averages every "
            "gradient over every worker; use stop",
        )
        unsupported = [
            name
            for name, used in (
                ("algorithm.levels", bool(a.levels)),
                ("algorithm.sync_delay", a.sync_delay > 0),
                ("algorithm.fragments", a.fragments > 1),
                ("comm.sync_compression", comm.sync_compression != "none"),
                ("train.device=cuda", self.train.device.startswith("cuda")),
            )
            if used
        ]
        _check(
            not unsupported,
            key,
            f"continue works with the blocking average on the CPU; not yet with {', '.join(unsupported)}; use stop",
        )

    def validate(self) -> None:
        check_declared(self)
        for name in ("model", "data", "optim", "algorithm", "comm", "train", "checkpoint", "output"):
            getattr(self, name).validate(name)
        language_data = self.data.name in LANGUAGE_DATA
        if self.model.name == "gpt" or language_data:
            _check(
                self.model.name == "gpt" and language_data,
                "model.name" if language_data else "data.name",
                f"{self.model.name} cannot learn {self.data.name}: a language model (model.name gpt) learns "
                "token data (data.name tokens or text), and only it does",
            )
        if self.data.name == "text":
            _check(
                self.model.gpt.vocab >= 256,
                "model.gpt.vocab",
                f"byte-level text (data.name text) has 256 token ids; {self.model.gpt.vocab} is too few",
            )
        if self.comm.sync_compression != "none":
            _check(
                self.algorithm.method != "allreduce",
                "comm.sync_compression",
                "compresses model averages; method 'allreduce' averages gradients (keep it at none)",
            )
        if self.comm.gradient_compression != "none":
            _check(
                self.algorithm.method != "local_sgd",
                "comm.gradient_compression",
                "compresses the gradients of synchronous steps; method 'local_sgd' has none (keep it at none, "
                "or use comm.sync_compression for its model averages)",
            )
            # fp16 saturates an overflowing gradient at ±65504 where a cast would give inf: the loss scaler
            # would never see the overflow it must back off from. bf16 keeps inf and NaN.
            _check(
                not (self.comm.gradient_compression == "fp16" and self.train.precision == "fp16"),
                "comm.gradient_compression",
                "fp16 saturates gradients at ±65504, which hides an overflow from train.precision=fp16's loss "
                "scaler; use bf16",
            )
        if self.comm.on_worker_loss == "continue":
            self._check_continue()
        if self.comm.backend == "simulated":
            # A simulation is one process that runs minutes: it writes no checkpoints.
            _check(
                self.checkpoint.every_steps == 0 and self.checkpoint.every_minutes == 0,
                "checkpoint",
                "comm.backend=simulated writes no checkpoints; set checkpoint.every_steps=0 and "
                "checkpoint.every_minutes=0",
            )
            # One process, one GradScaler: an overflow in one simulated worker would skip every worker's
            # step, where ranks skip alone; the simulation would no longer be what mpirun computes.
            _check(
                not self.train.compile,
                "train.compile",
                "comm.backend=simulated runs its workers as one batched model (torch.func over stacked "
                "weights), which is not compiled; set train.compile=false",
            )
            _check(
                self.train.precision != "fp16",
                "train.precision",
                "fp16 needs a loss scaler per rank; comm.backend=simulated has one for all its workers: "
                "use bf16 or fp32",
            )
