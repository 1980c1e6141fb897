"""What one benchmark run measures, and the checks that refuse bad input before any rank communicates.

The options are a schema dataclass like the run config: each declares its meaning, default and range
once, and from that declaration the config loader checks names, types and ranges (messages name the
command-line option) and the command line generates its ``bench`` flags and their help. Nothing here
imports torch, so that building the command line stays cheap for every verb.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..config import build, setting
from ..config.fields import check_declared
from ..config.schema import Backend, Precision
from ..errors import UserError
from .phases import PHASE_NAMES, describe_phases
from .variants import VARIANT_NAMES, VARIANTS

# The simulated backend runs workers inside one process, without a launcher: the bench measures ranks.
BACKENDS = tuple(name for name in typing.get_args(Backend) if name != "simulated")
PRECISIONS: tuple[Precision, ...] = typing.get_args(Precision)
BASELINES = ("horovod", "ddp")


def _flag(_section: str, name: str) -> str:
    """Messages about the options name the command-line option that sets them."""
    declared = {f.name: f for f in fields(BenchOptions)}.get(name)
    flag = declared.metadata.get("flag") if declared is not None else None
    return str(flag) if flag else "--" + name.replace("_", "-")


@dataclass(frozen=True)
class BenchOptions:
    """The problem size and the measurement plan; every rank runs with the same options.

    The defaults are the study's ImageNet problem (ResNet-50, 32 images of 224² per worker).
    ``quick`` swaps in a problem that runs in seconds on two CPU cores, for CI and for
    checking an installation; options given explicitly still win over it.
    """

    model: str = setting(
        "resnet50",
        "smallcnn, mlp, a torchvision classifier, or gpt (a decoder-only transformer language model, shaped by "
        "the --gpt-* options, trained with AdamW on random token ids).",
        rule="not empty",
    )
    batch: int = setting(
        32, "Samples per rank and step (windows of --gpt-seq-len tokens for gpt).", range=">= 1, <= 1e6"
    )
    image_size: int = setting(224, "Side of the square input images (not gpt).", range=">= 8, <= 8192")
    num_classes: int = setting(
        1000,
        "Output classes of the model (not gpt: its classes are --gpt-vocab).",
        range=">= 2, <= 1e6",
        flag="--classes",
    )
    # The default transformer is configs/lm/demo.yaml's byte-level GPT: a step takes milliseconds on a CPU core.
    gpt_layers: int = setting(4, "--model gpt: transformer blocks (model.gpt.layers).", range=">= 1, <= 1024")
    gpt_heads: int = setting(4, "--model gpt: attention heads per block (model.gpt.heads).", range=">= 1, <= 1024")
    gpt_dim: int = setting(
        128,
        "--model gpt: width of the residual stream (model.gpt.dim).",
        range=">= 1, <= 65536",
        rule="a multiple of --gpt-heads",
    )
    gpt_seq_len: int = setting(
        64, "--model gpt: tokens per sample, the window trained on (model.gpt.seq_len).", range=">= 1, <= 1e6"
    )
    gpt_vocab: int = setting(
        256,
        "--model gpt: token ids (model.gpt.vocab): 256 is byte-level, GPT-2's is 50304; at least 256, the bench's "
        "run config being byte-level text's (data.name text, never read: the ids are random).",
        range=">= 256, <= 4294967296",
    )
    backend: str = setting("auto", "comm.backend of the package for the measured engine.", choices=BACKENDS)
    bucket_mb: float = setting(25.0, "Gradient bucket size in MiB for the engine and DDP.", range="> 0, <= 1e5")
    repeats: int = setting(
        5, "Timed repetitions of every measurement, after the untimed warm-up ones.", range=">= 1, <= 1e6"
    )
    warmup: int = setting(1, "Untimed repetitions of every measurement, first.", range=">= 0, <= 1e6")
    steps: int = setting(
        16,
        "Optimizer steps in one timed training window; a local SGD window is rounded up to "
        "whole sync periods (H · ⌈steps / H⌉), so that every window ends with a sync.",
        range=">= 1, <= 1e6",
    )
    sync_periods: tuple[int, ...] = setting(
        (1, 2, 4, 8, 16, 32), "Local SGD periods H to measure.", range="<= 1e6", rule="distinct positive integers"
    )
    baselines: tuple[str, ...] = setting(
        BASELINES, "Reference loops for synchronous training.", rule=f"any of {', '.join(BASELINES)}"
    )
    phases: tuple[str, ...] = setting(
        PHASE_NAMES, f"What to measure ({describe_phases()}).", rule=f"at least one of {', '.join(PHASE_NAMES)}"
    )
    precisions: tuple[Precision, ...] = setting(
        ("fp32", "bf16"),
        "train.precision values the precision phase measures (fp16 autocast is very slow on CPUs).",
        rule=f"any of {', '.join(PRECISIONS)}",
    )
    streaming_variants: tuple[str, ...] = setting(
        VARIANT_NAMES,
        "Configurations the streaming phase measures (bench/variants.py), e.g. h4_delay3,h1_int8_delay1.",
        rule=f"any of {', '.join(VARIANT_NAMES)}",
    )
    simulated_workers: int = setting(
        16, "Workers the simulation phase runs as one batched model in one process.", range=">= 2, <= 4096"
    )
    channels_last: bool | None = setting(
        None,
        "Channels-last images in the precision phase (null: as train.channels_last auto: on for convolutional "
        "models on CUDA).",
    )
    compile: bool = setting(
        False,
        "The precision phase also measures both loops through torch.compile (train.compile), paired with "
        "the eager ones.",
    )
    out: str | None = setting(
        None, "Write the results as JSON to this file (null: print only).", rule="a file in an existing folder"
    )
    io_dir: str | None = setting(
        None,
        "Where checkpoint files are written: it must be a folder every rank "
        "sees (null: the folder of out, else the current one). A private "
        "subfolder is made and removed.",
        rule="an existing writable folder",
    )
    threads: int = setting(0, "torch threads per rank (0: as for training).", range=">= 0, <= 4096")
    sync_thread: bool | None = setting(
        None, "comm.sync_thread of the measured engine (null: auto, on where a rank has a core to spare)."
    )
    compare_sync_thread: bool = setting(
        False,
        "The streaming phase measures each overlapped configuration (sync_delay > 0) without and with "
        "comm.sync_thread, alternating within every repetition: the second is <variant>_sync_thread, and "
        "streaming.<variant>.sync_thread_speedup pairs the two repetition by repetition.",
    )
    device: str = setting("auto", "auto, cpu or cuda[:N].", rule="'auto', 'cpu' or 'cuda[:N]'")
    ranks_per_worker: int | None = setting(
        None,
        "Ranks per local-SGD worker in the hierarchy phase: gradients averaged inside the worker every step, "
        "the model over all ranks every H steps (null: 2 where the world size is even and above 2, else the "
        "phase is skipped).",
        range=">= 2, <= 1e6",
    )
    projection_step_seconds: float | None = setting(
        None,
        "Compute time per step for the projection instead of the measured one (e.g. a GPU's).",
        range="> 0, <= 1e6",
        flag="--project-step-seconds",
    )
    projection_ranks_per_node: int = setting(
        8, "GPUs per node in the two-fabric projection.", range=">= 2, <= 4096", flag="--project-ranks-per-node"
    )
    quick: bool = setting(
        False, "A problem that runs in seconds on two CPU cores; options given explicitly still apply."
    )

    @staticmethod
    def quick_defaults() -> dict[str, Any]:
        return {
            "model": "smallcnn",
            "batch": 8,
            "image_size": 32,
            "num_classes": 10,
            "repeats": 3,
            "warmup": 1,
            "steps": 8,
            "simulated_workers": 4,
        }

    @classmethod
    def from_given(cls, quick: bool = False, **given: Any) -> BenchOptions:
        """Options from what the user gave (None = not given): given values, else quick or normal defaults.

        Names and types are checked by the config loader, so a wrong one is refused with one line."""
        chosen = {k: v for k, v in given.items() if v is not None}
        base = cls.quick_defaults() if quick else {}
        return build(cls, {**base, **chosen, "quick": quick}, name=_flag)

    @property
    def tokens_per_sample(self) -> int | None:
        """Tokens in one sample of a language model (--gpt-seq-len), None for a classifier: its figures
        in tokens/s are its samples/s times this."""
        return self.gpt_seq_len if self.model == "gpt" else None

    def sync_thread_measured(self) -> bool | str:
        """The JSON's measurement.sync_thread: true, false, auto, or compared (off and on, side by side)."""
        if self.compare_sync_thread:
            return "compared"
        return "auto" if self.sync_thread is None else self.sync_thread

    def validate(self) -> None:
        """Raise ``UserError`` (one line, exit 2) for anything wrong, before any communication.

        The declared ranges and choices first, then what a bound cannot say."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        need(bool(self.model), "--model: must not be empty")
        check_declared(self, name=_flag)
        need(
            self.gpt_dim % self.gpt_heads == 0,
            f"--gpt-dim: {self.gpt_dim} is not a multiple of --gpt-heads ({self.gpt_heads})",
        )
        need(
            len(self.sync_periods) >= 1 and all(h >= 1 for h in self.sync_periods),
            f"--sync-periods: must be positive integers, got {','.join(map(str, self.sync_periods)) or 'nothing'}",
        )
        need(
            len(set(self.sync_periods)) == len(self.sync_periods),
            f"--sync-periods: {','.join(map(str, self.sync_periods))} repeats a value",
        )
        for name in self.baselines:
            need(
                name in BASELINES,
                f"--baselines: unknown baseline {name!r}; choose from {', '.join(BASELINES)} or 'none'",
            )
        need(len(self.phases) >= 1, "--phases: choose at least one phase")
        need(len(self.precisions) >= 1, "--precisions: choose at least one precision")
        for name in self.phases:
            need(name in PHASE_NAMES, f"--phases: unknown phase {name!r}; choose from {', '.join(PHASE_NAMES)}")
        need(len(self.streaming_variants) >= 1, "--streaming-variants: choose at least one configuration")
        for name in self.streaming_variants:
            need(
                name in VARIANT_NAMES,
                f"--streaming-variants: unknown configuration {name!r}; choose from {', '.join(VARIANT_NAMES)}",
            )
        if self.compare_sync_thread:
            need(
                self.sync_thread is None,
                "--compare-sync-thread: measures comm.sync_thread off and on; leave --sync-thread out",
            )
            need("streaming" in self.phases, "--compare-sync-thread: needs the streaming phase (--phases)")
            overlapped = [v.name for v in VARIANTS if v.name in self.streaming_variants and v.overlapped]
            need(
                bool(overlapped),
                "--compare-sync-thread: none of --streaming-variants overlaps its sync (sync_delay > 0), "
                "and only those use the sync thread",
            )
        need(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            f"--device: must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}",
        )
        if self.out is not None:
            out = Path(self.out)
            need(not out.is_dir(), f"--out: '{out}' is a folder; give a file name such as bench.json")
            need(out.parent.is_dir() if str(out.parent) else True, f"--out: folder '{out.parent}' does not exist")
        if "checkpoint" in self.phases:
            folder = self.checkpoint_folder()
            need(folder.is_dir(), f"--io-dir: folder '{folder}' does not exist")
            need(os.access(folder, os.W_OK | os.X_OK), f"--io-dir: folder '{folder}' is not writable")

    def workers_of(self, world_size: int) -> int | None:
        """Ranks per worker for the hierarchy phase in a world of ``world_size`` ranks, or None when
        the phase cannot run and was not asked for explicitly (it is then skipped, with the reason).

        Raises ``UserError`` when ``--ranks-per-worker`` was given and the world cannot hold at least
        two workers of that many ranks: one worker of every rank is all-reduce SGD, measured already."""
        if "hierarchy" not in self.phases:
            return None
        if self.ranks_per_worker is None:
            return 2 if world_size > 2 and world_size % 2 == 0 else None
        r = self.ranks_per_worker
        if world_size % r or world_size // r < 2:
            raise UserError(
                f"--ranks-per-worker: {r} ranks per worker need a world of 2·{r}, 3·{r}, ... ranks "
                f"(two workers or more); this run has {world_size}"
            )
        return r

    def checkpoint_folder(self) -> Path:
        if self.io_dir is not None:
            return Path(self.io_dir)
        if self.out is not None:
            return Path(self.out).parent if str(Path(self.out).parent) else Path(".")
        return Path(".")

    def window_steps(self, sync_period: int | None = None) -> int:
        """Steps in one timed window; whole sync periods for local SGD."""
        if sync_period is None:
            return self.steps
        return sync_period * -(-self.steps // sync_period)
