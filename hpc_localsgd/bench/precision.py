"""The training step's computation alone, per ``train.precision``: the package's step without
communication (the engine's train_step over its flat buffer, autocast and, for fp16, the loss scaler)
against a plain PyTorch loop with the same precision and memory format, written as torchvision's
reference recipe writes it (for a language model, as nanoGPT's training loop). What mixed precision buys
shows across the precisions' rates. A language model's step on a GPU also gets its model FLOPs utilisation
(MFU): the FLOPs its tokens/s does over the GPU's dense peak at that precision."""

from __future__ import annotations

from typing import Any

import torch

from ..config.schema import Precision
from ..train.device import has_2d_convolutions, peak_flops
from ..train.gpt import flops_per_token
from .context import BenchContext
from .stats import Figure, paired_ratios
from .throughput import THROUGHPUT_TARGET
from .timing import alternating
from .workload import EngineLoop, PlainLoop


def uses_channels_last(ctx: BenchContext) -> bool:
    """``--channels-last``, or as train.channels_last auto: on for convolutional models on CUDA."""
    if ctx.options.channels_last is not None:
        return ctx.options.channels_last
    return ctx.device.type == "cuda" and has_2d_convolutions(ctx.workload.new_model())


def run(ctx: BenchContext) -> None:
    """Each precision's loops paired repetition by repetition. With ``--compile true`` both loops also run
    through torch.compile, alternating with the eager ones in every repetition (the compilation happens
    in the warm-up)."""
    channels_last = uses_channels_last(ctx)
    ctx.mfu = mfu_basis(ctx)
    for precision in ctx.options.precisions:
        times = _measure(ctx, precision, channels_last)
        _add_figures(ctx, precision, "channels-last" if channels_last else "contiguous", times)
        if ctx.mfu is not None:
            _add_mfu(ctx, precision, ctx.mfu, times)


PEAK_SOURCE = (
    "dense peak FLOP/s per GPU from the vendors' data sheets, without sparsity (hpc_localsgd/train/device.py "
    "PEAK_FLOPS): bf16 and fp16 on the tensor cores, fp32 on the CUDA cores (TF32 off)"
)


def mfu_basis(ctx: BenchContext) -> dict[str, Any] | None:
    """What a language model's MFU divides by (JSON: measurement.mfu): its FLOPs per token, and the GPU's peak
    at each precision measured, null with the reason where there is none (a CPU, a GPU not in the table).
    None for a classifier, whose FLOPs the bench does not count."""
    if ctx.workload.tokens_per_sample is None:
        return None
    precisions = ctx.options.precisions
    basis: dict[str, Any] = {
        "flops_per_token": flops_per_token(ctx.workload.cfg.model.gpt),
        "device": None,
        "peak_flops": {precision: None for precision in precisions},
        "peak_source": PEAK_SOURCE,
        "reason": "no GPU",
    }
    if ctx.device.type != "cuda":
        return basis
    name = torch.cuda.get_device_name(ctx.device)
    peaks = {precision: peak_flops(name, precision) for precision in precisions}
    missing = [precision for precision, peak in peaks.items() if peak is None]
    reason = f"{name}: no peak for {', '.join(missing)} in the table (train/device.py PEAK_FLOPS)" if missing else None
    return {**basis, "device": name, "peak_flops": peaks, "reason": reason}


def _add_mfu(ctx: BenchContext, precision: Precision, basis: dict[str, Any], times: dict[str, list[float]]) -> None:
    """``precision.<p>.mfu`` (and ``.compiled_mfu``): FLOPs per token × tokens/s per GPU / the GPU's peak, per
    repetition; skipped with the basis's reason where the peak is unknown."""
    modes = [("engine_eager", "mfu", "")] + (
        [("engine_compiled", "compiled_mfu", ", forward through torch.compile")] if "engine_compiled" in times else []
    )
    peak = basis["peak_flops"][precision]
    if peak is None:
        for _, figure_id, _ in modes:
            ctx.skip(f"precision.{precision}.{figure_id}", basis["reason"])
        return
    tokens_per_gpu = ctx.options.batch * ctx.options.window_steps() * (ctx.workload.tokens_per_sample or 0)
    flops = basis["flops_per_token"]
    ctx.add(
        *(
            Figure(
                f"precision.{precision}.{figure_id}",
                "precision",
                f"model FLOPs utilisation of the package's step in {precision}{how}: {flops:,} FLOPs per token × "
                f"tokens/s per GPU / {peak:.4g} FLOP/s ({basis['device']}, {precision})",
                "fraction",
                [flops * tokens_per_gpu / t / peak for t in times[loop]],
                notes=[f"peak {peak:.4g} FLOP/s: {PEAK_SOURCE}", f"flops_per_token {flops}"],
            )
            for loop, figure_id, how in modes
        )
    )


def _measure(ctx: BenchContext, precision: Precision, channels_last: bool) -> dict[str, list[float]]:
    """Seconds per repetition of ``engine_<mode>`` and ``plain_<mode>`` for each mode measured."""
    comm, options = ctx.comm, ctx.options
    steps = options.window_steps()
    loops: dict[str, EngineLoop | PlainLoop] = {}
    for mode in ("eager", "compiled") if options.compile else ("eager",):
        compiled = mode == "compiled"
        loops[f"engine_{mode}"] = EngineLoop(
            f"engine_{precision}_{mode}",
            ctx.workload,
            comm,
            "local_sgd",
            None,  # the step alone: never averaging, no gradient hooks
            precision=precision,
            channels_last=channels_last,
            compiled=compiled,
        )
        loops[f"plain_{mode}"] = PlainLoop(ctx.workload, precision, channels_last, compiled=compiled)
    measured = alternating(
        comm,
        ctx.device,
        [lambda loop=loop: loop.run(steps) for loop in loops.values()],  # type: ignore[misc]
        options.repeats,
        max(1, options.warmup),  # the first steps allocate autocast caches and the scaler's state (and compile)
    )
    for loop in loops.values():
        if isinstance(loop, EngineLoop):
            loop.close()
    return dict(zip(loops, measured, strict=True))


def _add_figures(ctx: BenchContext, precision: Precision, layout: str, times: dict[str, list[float]]) -> None:
    samples = ctx.samples_per_step * ctx.options.window_steps()

    def rate(loop: str, figure_id: str, description: str) -> Figure:
        return Figure(
            f"precision.{precision}.{figure_id}",
            "precision",
            description,
            "samples/s",
            [samples / t for t in times[loop]],
        )

    def ratio(loop: str, over: str, figure_id: str, description: str, judged: bool = True) -> Figure:
        """The rate of ``loop`` over that of ``over``, repetition by repetition."""
        target = THROUGHPUT_TARGET if judged else None
        ratios = paired_ratios(times[over], times[loop])
        return Figure(f"precision.{precision}.{figure_id}", "precision", description, "ratio", ratios, target=target)

    plain = f"a plain PyTorch loop in {precision}, {layout} (model.to(memory_format), autocast" + (
        ", GradScaler)" if precision == "fp16" else ")"
    )
    if ctx.workload.tokens_per_sample is not None:
        plain = f"a plain nanoGPT-style loop in {precision} (autocast, clip_grad_norm_, AdamW" + (
            ", GradScaler)" if precision == "fp16" else ")"
        )
    ctx.add(
        rate(
            "engine_eager",
            "samples_per_s",
            f"the package's training step in {precision}, {layout}, without communication (all ranks)",
        ),
        rate("plain_eager", "plain_samples_per_s", plain),
        ratio(
            "engine_eager", "plain_eager", "vs_plain", f"the package's step / the plain loop in {precision} (paired)"
        ),
    )
    if "engine_compiled" not in times:
        return
    ctx.add(
        rate(
            "engine_compiled",
            "compiled_samples_per_s",
            f"the package's training step in {precision}, {layout}, forward through torch.compile "
            "(train.compile), without communication (all ranks)",
        ),
        rate("plain_compiled", "compiled_plain_samples_per_s", plain + " through torch.compile(model)"),
        ratio(
            "engine_compiled",
            "plain_compiled",
            "compiled_vs_plain",
            f"the package's compiled step / the compiled plain loop in {precision} (paired)",
        ),
        ratio(
            "engine_compiled",
            "engine_eager",
            "compile_speedup",
            f"what train.compile buys: the package's compiled step / its eager step in {precision} (paired)",
            judged=False,
        ),
    )
