"""The training step's computation alone, per ``train.precision``: the package's step without
communication (the engine's train_step over its flat buffer, autocast and, for fp16, the loss scaler)
against a plain PyTorch loop with the same precision and memory format, written as torchvision's
reference recipe writes it. What mixed precision buys shows across the precisions' rates."""

from __future__ import annotations

from ..config.schema import Precision
from ..train.device import has_2d_convolutions
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
    for precision in ctx.options.precisions:
        times = _measure(ctx, precision, channels_last)
        _add_figures(ctx, precision, "channels-last" if channels_last else "contiguous", times)


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
