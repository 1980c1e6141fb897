"""What one benchmark run measures, and the checks that refuse bad input before any rank communicates."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

from ..comm import BACKENDS
from ..errors import UserError

PHASES = ("averaging", "throughput", "slowmo", "checkpoint")
BASELINES = ("horovod", "ddp")


@dataclass(frozen=True)
class BenchOptions:
    """The problem size and the measurement plan; every rank runs with the same options.

    The defaults are the study's ImageNet problem (ResNet-50, 32 images of 224² per worker).
    ``quick`` swaps in a problem that runs in seconds on two CPU cores, for CI and for
    checking an installation; options given explicitly still win over it.
    """

    model: str = "resnet50"
    batch: int = 32
    image_size: int = 224
    num_classes: int = 1000
    backend: str = "auto"
    bucket_mb: float = 25.0
    # Timed repetitions of every measurement, after ``warmup`` untimed ones.
    repeats: int = 5
    warmup: int = 1
    # Optimizer steps in one timed training window; a local SGD window is rounded up to whole
    # sync periods (H · ⌈steps / H⌉), so that every window ends with a sync.
    steps: int = 16
    sync_periods: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    baselines: tuple[str, ...] = BASELINES
    phases: tuple[str, ...] = PHASES
    out: Optional[str] = None
    # Where checkpoint files are written: it must be a folder every rank sees (default: the
    # folder of ``out``, else the current one). A private subfolder is made and removed.
    io_dir: Optional[str] = None
    threads: int = 0
    device: str = "auto"
    # Compute time per step for the projection instead of the measured one (e.g. a GPU's).
    projection_step_seconds: Optional[float] = None
    quick: bool = False

    @staticmethod
    def quick_defaults() -> dict[str, Any]:
        return {"model": "smallcnn", "batch": 8, "image_size": 32, "num_classes": 10, "repeats": 3, "warmup": 1,
                "steps": 8}

    @classmethod
    def from_given(cls, quick: bool = False, **given: Any) -> "BenchOptions":
        """Options from what the user gave (None = not given): given values, else quick or normal defaults."""
        chosen = {k: v for k, v in given.items() if v is not None}
        unknown = set(chosen) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown benchmark options: {sorted(unknown)}")
        base = cls.quick_defaults() if quick else {}
        return replace(cls(quick=quick), **{**base, **chosen})

    def validate(self) -> None:
        """Raise ``UserError`` (one line, exit 2) for anything wrong, before any communication."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        need(bool(self.model), "--model: must not be empty")
        need(self.batch >= 1, f"--batch: must be >= 1, got {self.batch}")
        need(self.image_size >= 8, f"--image-size: must be >= 8, got {self.image_size}")
        need(self.num_classes >= 2, f"--classes: must be >= 2, got {self.num_classes}")
        need(self.backend in BACKENDS, f"--backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        need(self.bucket_mb > 0, f"--bucket-mb: must be > 0, got {self.bucket_mb}")
        need(self.repeats >= 1, f"--repeats: must be >= 1, got {self.repeats}")
        need(self.warmup >= 0, f"--warmup: must be >= 0, got {self.warmup}")
        need(self.steps >= 1, f"--steps: must be >= 1, got {self.steps}")
        need(len(self.sync_periods) >= 1 and all(h >= 1 for h in self.sync_periods),
             f"--sync-periods: must be positive integers, got {','.join(map(str, self.sync_periods)) or 'nothing'}")
        need(len(set(self.sync_periods)) == len(self.sync_periods),
             f"--sync-periods: {','.join(map(str, self.sync_periods))} repeats a value")
        for name in self.baselines:
            need(name in BASELINES, f"--baselines: unknown baseline {name!r}; choose from {', '.join(BASELINES)} "
                                    "or 'none'")
        need(len(self.phases) >= 1, "--phases: choose at least one phase")
        for name in self.phases:
            need(name in PHASES, f"--phases: unknown phase {name!r}; choose from {', '.join(PHASES)}")
        need(self.threads >= 0, f"--threads: must be >= 0, got {self.threads}")
        need(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
             f"--device: must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        need(self.projection_step_seconds is None or self.projection_step_seconds > 0,
             f"--project-step-seconds: must be > 0, got {self.projection_step_seconds}")
        if self.out is not None:
            out = Path(self.out)
            need(not out.is_dir(), f"--out: '{out}' is a folder; give a file name such as bench.json")
            need(out.parent.is_dir() if str(out.parent) else True,
                 f"--out: folder '{out.parent}' does not exist")
        if "checkpoint" in self.phases:
            folder = self.checkpoint_folder()
            need(folder.is_dir(), f"--io-dir: folder '{folder}' does not exist")
            need(os.access(folder, os.W_OK | os.X_OK), f"--io-dir: folder '{folder}' is not writable")

    def checkpoint_folder(self) -> Path:
        if self.io_dir is not None:
            return Path(self.io_dir)
        if self.out is not None:
            return Path(self.out).parent if str(Path(self.out).parent) else Path(".")
        return Path(".")

    def window_steps(self, sync_period: Optional[int] = None) -> int:
        """Steps in one timed window; whole sync periods for local SGD."""
        if sync_period is None:
            return self.steps
        return sync_period * -(-self.steps // sync_period)
