"""The global sync's variants against the no-communication limit: longer periods, overlap
(``sync_delay``), fragments and compressed updates (``comm.sync_compression``), each a configuration
of the package's one training step, measured as training windows interleaved repetition by
repetition (phases.py), and the exact bytes each sends per sync.

Run it where the network is slow, for example the emulated 1 Gb/s link of ``bench/slownet.py``:

    python -m hpc_localsgd.bench.slownet 2 1gbit -- python -m hpc_localsgd bench --phases streaming ...
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..algorithms.compression import encoded_bytes
from ..config.schema import SyncCompression
from .phases import BenchContext, _interleaved_windows, _Measured, _rate, _Window
from .stats import Figure, Target, slowest
from .workload import EngineLoop

OVERLAP_TARGET = Target(">=", 0.95)  # H = 4 with its sync overlapped by 3 steps
COMPRESSED_TARGET = Target(">=", 0.80)  # int8 with error feedback, every second step, overlapped by one
INT8_BYTES_TARGET = Target("<=", 0.27)
HALF_BYTES_TARGET = Target("<=", 0.5)


@dataclass(frozen=True)
class SyncVariant:
    name: str
    sync_period: int
    sync_delay: int = 0
    fragments: int = 1
    compression: SyncCompression = "none"
    target: Target | None = None

    def describe(self) -> str:
        parts = [f"local SGD H={self.sync_period}"]
        if self.sync_delay:
            parts.append(f"sync overlapped with {self.sync_delay} step(s)")
        if self.fragments > 1:
            parts.append(f"{self.fragments} fragments")
        if self.compression != "none":
            feedback = " with error feedback" if self.compression == "int8" else ""
            parts.append(f"{self.compression} updates{feedback}")
        return ", ".join(parts)


VARIANTS = (
    SyncVariant("h1", 1),
    SyncVariant("h4", 4),
    SyncVariant("h4_delay1", 4, 1),
    SyncVariant("h4_delay3", 4, 3, target=OVERLAP_TARGET),
    SyncVariant("h4_fragments4", 4, 0, 4),
    SyncVariant("h4_fragments2_delay1", 4, 1, 2),
    SyncVariant("h1_bf16", 1, compression="bf16"),
    SyncVariant("h1_int8", 1, compression="int8"),
    SyncVariant("h2_int8_delay1", 2, 1, compression="int8", target=COMPRESSED_TARGET),
    SyncVariant("h4_int8_delay3", 4, 3, compression="int8"),
)


def measure_streaming(ctx: BenchContext, bare_seconds: list[float]) -> None:
    """Every variant's windows (whole sync periods, so that none ends with an average in flight),
    against the bare limit measured before any communication library started."""
    options = ctx.options
    loops = {
        v.name: EngineLoop(
            f"streaming_{v.name}",
            ctx.workload,
            ctx.comm,
            "local_sgd",
            v.sync_period,
            sync_delay=v.sync_delay,
            fragments=v.fragments,
            compression=v.compression,
        )
        for v in VARIANTS
    }
    windows = {v.name: _Window(loops[v.name], options.window_steps(v.sync_period)) for v in VARIANTS}
    measured = _interleaved_windows(ctx, windows)
    for loop in loops.values():
        loop.close()
    bare_rate = float(np.median(_rate(ctx, _Measured(options.window_steps(), slowest(ctx.comm, bare_seconds), [], []))))
    for variant in VARIANTS:
        m = measured[variant.name]
        rate = _rate(ctx, m)
        engine = loops[variant.name].engine
        ctx.add(
            Figure(
                f"streaming.{variant.name}.samples_per_s",
                "streaming",
                variant.describe() + " (all ranks)",
                "samples/s",
                rate,
            ),
            Figure(
                f"streaming.{variant.name}.efficiency",
                "streaming",
                f"{variant.describe()}: samples/s over the bare no-communication limit",
                "ratio",
                [r / bare_rate for r in rate],
                target=variant.target,
            ),
            Figure(
                f"streaming.{variant.name}.comm_share",
                "streaming",
                f"{variant.describe()}: share of the time blocked in communication (encoding included)",
                "fraction",
                m.share,
            ),
            Figure(
                f"streaming.{variant.name}.bytes_per_sync",
                "streaming",
                f"{variant.describe()}: bytes a rank sends per sync of the whole model, scales included",
                "B",
                [float(engine.bytes_per_sync)],
                exact=True,
            ),
        )
    numel = sum(p.numel() for p in loops["h1"].model.parameters())
    for codec, target in (("bf16", HALF_BYTES_TARGET), ("fp16", HALF_BYTES_TARGET), ("int8", INT8_BYTES_TARGET)):
        ctx.add(
            Figure(
                f"streaming.{codec}.bytes_vs_fp32",
                "streaming",
                f"bytes of the model's update in {codec} over fp32 (parameters; scales included)",
                "ratio",
                [encoded_bytes(codec, numel) / encoded_bytes("none", numel)],  # type: ignore[arg-type]
                target=target,
                exact=True,
            ),
        )
