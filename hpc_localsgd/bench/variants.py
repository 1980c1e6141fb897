"""The configurations the streaming phase measures (streaming.py): names, periods, delays, fragments and
codecs, kept apart from the measurement so that the options can check ``--streaming-variants`` against them."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from ..config.schema import GradientCompression, Method, SyncCompression
from .stats import Target

OVERLAP_TARGET = Target(">=", 0.95)  # H = 4 with its sync overlapped by 3 steps
COMPRESSED_TARGET = Target(">=", 0.80)  # int8 with error feedback, every step, overlapped by one
INT8_BYTES_TARGET = Target("<=", 0.27)
SYNC_THREAD_SUFFIX = "_sync_thread"  # the twin of a configuration measured with comm.sync_thread on
HALF_BYTES_TARGET = Target("<=", 0.5)
# The bytes of each lossy codec's update over fp32 (the codecs are config.schema's SyncCompression).
BYTES_TARGETS: dict[SyncCompression, Target] = {
    codec: INT8_BYTES_TARGET if codec == "int8" else HALF_BYTES_TARGET
    for codec in typing.get_args(SyncCompression)
    if codec != "none"
}


@dataclass(frozen=True)
class SyncVariant:
    name: str
    sync_period: int
    sync_delay: int = 0
    fragments: int = 1
    compression: SyncCompression = "none"
    target: Target | None = None
    method: Method = "local_sgd"
    gradient_compression: GradientCompression = "none"
    # comm.sync_thread of this configuration's engine (None: the bench's --sync-thread, auto by default).
    sync_thread: bool | None = None

    @property
    def synchronous(self) -> bool:
        """All-reduce SGD: its gradients travel every step, overlapped with backward."""
        return self.method == "allreduce"

    @property
    def overlapped(self) -> bool:
        """Its global sync travels while steps run (``sync_delay`` > 0): the only syncs the sync thread takes."""
        return not self.synchronous and self.sync_delay > 0

    def with_sync_thread(self, on: bool) -> SyncVariant:
        """This configuration with comm.sync_thread set; the one with the thread is named ``<name>_sync_thread``."""
        return dataclasses.replace(self, name=self.name + SYNC_THREAD_SUFFIX if on else self.name, sync_thread=on)

    @property
    def codec(self) -> SyncCompression:
        """How what travels is encoded: the gradients of all-reduce SGD, the update Δ of local SGD."""
        return self.gradient_compression if self.synchronous else self.compression

    def describe(self) -> str:
        if self.synchronous:
            return f"all-reduce SGD, {'fp32' if self.codec == 'none' else self.codec} gradient buckets"
        parts = [f"local SGD H={self.sync_period}"]
        if self.sync_delay:
            parts.append(f"sync overlapped with {self.sync_delay} step(s)")
        if self.fragments > 1:
            parts.append(f"{self.fragments} fragments")
        if self.compression != "none":
            feedback = " with error feedback" if self.compression == "int8" else ""
            parts.append(f"{self.compression} updates{feedback}")
        if self.sync_thread is not None:
            parts.append("sync thread beside the step" if self.sync_thread else "no sync thread")
        return ", ".join(parts)


VARIANTS = (
    SyncVariant("allreduce", 1, method="allreduce"),
    SyncVariant("allreduce_bf16_gradients", 1, method="allreduce", gradient_compression="bf16"),
    SyncVariant("h1", 1),
    SyncVariant("h4", 4),
    SyncVariant("h4_delay1", 4, 1),
    SyncVariant("h4_delay3", 4, 3, target=OVERLAP_TARGET),
    SyncVariant("h4_delay4", 4, 4),
    SyncVariant("h4_fragments4", 4, 0, 4),
    SyncVariant("h4_fragments2_delay1", 4, 1, 2),
    SyncVariant("h1_bf16", 1, compression="bf16"),
    SyncVariant("h1_int8", 1, compression="int8"),
    SyncVariant("h1_int8_delay1", 1, 1, compression="int8", target=COMPRESSED_TARGET),
    SyncVariant("h2_int8_delay1", 2, 1, compression="int8"),
    SyncVariant("h4_int8_delay3", 4, 3, compression="int8"),
)

VARIANT_NAMES = tuple(variant.name for variant in VARIANTS)
