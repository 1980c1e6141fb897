"""``hpc-localsgd VERB ...``: each verb parses its arguments and calls one function of the package."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import UserError, print_line


def _rank_from_environment() -> int:
    from .launcher.env import detect_launch

    try:
        return detect_launch().layout.rank
    except UserError:
        return 0


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train.loop import train

    overrides = list(args.set or [])
    if args.run_dir:
        overrides.append(f"output.run_dir={args.run_dir}")
    notices: list[str] = []
    cfg = load_config(args.config, overrides, notices)
    if args.reshard and not args.resume:
        raise UserError("--reshard needs --resume")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other: choose one")
    train(
        cfg,
        overwrite=args.overwrite,
        resume=args.resume,
        reshard=args.reshard,
        stop_at_step=args.stop_at_step,
        notices=notices,
    )
    return 0


class _HelpConfig(argparse.Action):
    """``train --help-config``: like ``--help``, it prints and exits during parsing, so no config file is needed."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        from .config import RunConfig, describe

        sys.stdout.write(
            "Every key of a run config: a YAML section and key, or --set KEY=VALUE. Defaults are "
            f"written as YAML reads them.\n\n{describe(RunConfig)}\n"
        )
        parser.exit(0)


def _inspect(args: argparse.Namespace) -> int:
    from .io.inspect import describe, format_description

    description = describe(args.file, verify=not args.no_verify)
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    return 0 if description.get("valid", True) else 1


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import already_written, describe_plan, plan_sweep, run_here, submit, write_sweep

    if args.emulated_link is not None and not args.run_here:
        raise UserError("--emulated-link: only with --run-here (it runs the points on this machine)")
    plan = plan_sweep(args.grid, args.out)
    if args.run_here:
        if args.overwrite or not already_written(plan):
            write_sweep(plan, overwrite=args.overwrite)
        return 1 if run_here(plan, args.jobs, emulated_link=args.emulated_link) else 0
    print(describe_plan(plan))
    if args.dry_run:
        return 0
    write_sweep(plan, overwrite=args.overwrite)
    if args.submit:
        for array, job in zip(plan.arrays, submit(plan), strict=True):
            print(f"submitted {array} as job {job}")
    else:
        print(
            f"wrote {len(plan.points)} configs, manifest.json and {len(plan.arrays)} array script(s); "
            "submit with the sbatch lines above, or run again with --submit"
        )
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    write_report(
        args.run_dirs,
        out=args.out,
        overwrite=args.overwrite,
        tradeoff=args.tradeoff,
        timing=args.timing,
        target=args.target,
        measured=args.measured or (),
    )
    return 0


def _integer(text: str) -> int:
    """An integer option; exponent notation counts when it is whole (``--steps 1e3``), as in a config."""
    from .config.load import number_from_text

    try:
        return int(text)
    except ValueError:
        number = number_from_text(text, int)
        if number is None:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        return int(number)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(_integer(part) for part in text.split(",") if part.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _name_list(text: str) -> tuple[str, ...]:
    return () if text.strip() == "none" else tuple(part.strip() for part in text.split(",") if part.strip())


def _true_or_false(text: str) -> bool:
    if text not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text == "true"


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchOptions, run_bench

    given = {
        name: getattr(args, name)
        for name in (
            "model",
            "batch",
            "image_size",
            "num_classes",
            "backend",
            "bucket_mb",
            "repeats",
            "warmup",
            "steps",
            "sync_periods",
            "baselines",
            "phases",
            "out",
            "io_dir",
            "threads",
            "sync_thread",
            "compare_sync_thread",
            "device",
            "projection_step_seconds",
            "ranks_per_worker",
            "projection_ranks_per_node",
            "precisions",
            "channels_last",
            "compile",
            "simulated_workers",
            "streaming_variants",
        )
    }
    run_bench(BenchOptions.from_given(quick=args.quick, **given), command=["hpc-localsgd", *sys.argv[1:]])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpc-localsgd", description="Local SGD, post-local SGD and SlowMo on MPI ranks."
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    train = verbs.add_parser("train", help="train a model; run it once per rank (mpirun, srun, horovodrun)")
    train.add_argument("config", help="YAML config (see configs/)")
    train.add_argument(
        "--help-config",
        action=_HelpConfig,
        help="print every config key with its type, default, range and meaning, and exit",
    )
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set algorithm.sync_period=8 (repeatable)",
    )
    train.add_argument("--run-dir", help="shorthand for --set output.run_dir=DIR")
    train.add_argument(
        "--overwrite", action="store_true", help="replace the run (metrics, config, checkpoints) already in the run dir"
    )
    train.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue from a checkpoint: 'auto' takes the newest valid one in the run dir "
        "(or starts fresh when there is none)",
    )
    train.add_argument(
        "--reshard",
        choices=("average", "reset"),
        help="accept a checkpoint of another world size or algorithm: keep its parameters, "
        "and average (or zero) the per-rank optimizer state",
    )
    train.add_argument(
        "--stop-at-step",
        type=_integer,
        metavar="N",
        help="write a checkpoint after step N and stop, as a preempted job would",
    )
    train.set_defaults(handler=_train)
    inspect = verbs.add_parser("inspect", help="say what a checkpoint or metrics file holds")
    inspect.add_argument("file", help="a .h5 file written by hpc-localsgd")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument("--no-verify", action="store_true", help="skip reading every dataset's checksum")
    inspect.set_defaults(handler=_inspect)
    sweep = verbs.add_parser("sweep", help="expand a grid of runs into configs, a manifest and Slurm job arrays")
    sweep.add_argument("grid", help="sweep YAML (see configs/sweeps/)")
    mode = sweep.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print what would be written and submitted; write nothing")
    mode.add_argument("--submit", action="store_true", help="write everything, then sbatch each job array")
    mode.add_argument(
        "--run-here",
        action="store_true",
        help="write everything, then run every point on this machine (simulated points in-process, "
        "others under mpirun), skipping runs already finished",
    )
    sweep.add_argument("--jobs", type=_integer, default=1, help="with --run-here: runs at a time (default 1)")
    sweep.add_argument(
        "--emulated-link",
        metavar="RATE",
        help="with --run-here (as root): run each point's MPI ranks on an emulated network, one namespace per "
        "rank, links limited to RATE in tc's notation (e.g. 10mbit); their step times are then a measurement "
        "on that link (report --measured)",
    )
    sweep.add_argument("--out", help="output folder (default: sweeps/<name>)")
    sweep.add_argument("--overwrite", action="store_true", help="regenerate a sweep folder that already exists")
    sweep.set_defaults(handler=_sweep)
    report = verbs.add_parser(
        "report",
        help="figures (PNG, SVG) and a results table (CSV, Markdown) from the metrics of finished and running runs",
    )
    report.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="a run directory, a sweep folder (searched for metrics.h5 below it) or a metrics.h5",
    )
    report.add_argument("--out", default="report", metavar="DIR", help="output folder (default: ./report)")
    report.add_argument("--overwrite", action="store_true", help="replace report files already in --out")
    report.add_argument(
        "--tradeoff",
        action="store_true",
        help="add the speed-accuracy trade-off (tradeoff.csv, .md, figure): every configuration at projected time "
        "to train on an interconnect and final accuracy, its Pareto front, time to --target (stated default timing)",
    )
    report.add_argument(
        "--timing",
        metavar="BENCH_JSON",
        help="compute time per step and interconnects (α, β) for the trade-off, from the JSON that "
        "`hpc-localsgd bench --out` writes (implies --tradeoff)",
    )
    report.add_argument(
        "--target",
        type=float,
        default=0.9,
        metavar="FRACTION",
        help="time to target: steps, bytes and projected time to reach this fraction of all-reduce's final test "
        "accuracy at the same task and worker count (default: 0.9)",
    )
    report.add_argument(
        "--measured",
        nargs="+",
        metavar="RUN_DIR",
        help="runs trained on an emulated slow network (sweep --run-here --emulated-link): drawn beside the "
        "projection at their measured and projected time on that link, and tabled in tradeoff-measured.csv, "
        ".md (implies --tradeoff)",
    )
    report.set_defaults(handler=_report)
    bench = verbs.add_parser(
        "bench",
        help="measure averaging, throughput, SlowMo and checkpoints against their "
        "floors and baselines; run it once per rank (mpirun, srun)",
    )
    size = bench.add_argument_group("problem size (defaults: ResNet-50, 32 images of 224x224 per rank)")
    size.add_argument("--model", help="smallcnn, mlp or a torchvision classifier (default resnet50)")
    size.add_argument("--batch", type=_integer, help="samples per rank and step (default 32)")
    size.add_argument("--image-size", type=_integer, help="side of the square input images (default 224)")
    size.add_argument("--classes", dest="num_classes", type=_integer, help="output classes (default 1000)")
    size.add_argument(
        "--quick",
        action="store_true",
        help="a problem that runs in seconds on two CPU cores (smallcnn, batch 8, 32x32, 3 repeats, "
        "8 steps); options given explicitly still apply",
    )
    plan = bench.add_argument_group("measurement")
    plan.add_argument("--repeats", type=_integer, help="timed repetitions of every measurement (default 5)")
    plan.add_argument("--warmup", type=_integer, help="untimed repetitions first (default 1)")
    plan.add_argument(
        "--steps",
        type=_integer,
        help="training steps per timed window (default 16; local SGD windows are rounded up to whole sync periods)",
    )
    plan.add_argument(
        "--sync-periods", type=_int_list, metavar="H,H,...", help="local SGD periods to measure (default 1,2,4,8,16,32)"
    )
    plan.add_argument(
        "--phases",
        type=_name_list,
        metavar="NAME,...",
        help="averaging,throughput,streaming,precision,simulation,hierarchy,slowmo,checkpoint (default all)",
    )
    plan.add_argument(
        "--precisions",
        type=_name_list,
        metavar="NAME,...",
        help="train.precision values the precision phase measures: fp32,bf16,fp16 (default fp32,bf16)",
    )
    plan.add_argument(
        "--streaming-variants",
        type=_name_list,
        metavar="NAME,...",
        help="configurations of the streaming phase, e.g. h4_delay3,h1_int8_delay1 (default all)",
    )
    plan.add_argument("--simulated-workers", type=int, metavar="W", help="workers of the simulation phase (default 16)")
    plan.add_argument(
        "--channels-last",
        type=_true_or_false,
        metavar="true|false",
        help="channels-last images in the precision phase (default: on for convolutional models on CUDA)",
    )
    plan.add_argument(
        "--compile",
        type=_true_or_false,
        metavar="true|false",
        help="the precision phase also measures both loops through torch.compile, paired with eager (default false)",
    )
    plan.add_argument(
        "--baselines",
        type=_name_list,
        metavar="NAME,...|none",
        help="reference loops for synchronous training: horovod,ddp (default both)",
    )
    plan.add_argument(
        "--ranks-per-worker",
        type=_integer,
        metavar="R",
        help="ranks per local-SGD worker in the hierarchy phase (default 2 where the world size is even and > 2)",
    )
    plan.add_argument("--backend", help="comm.backend of the package: auto, horovod, mpi, torch, single (default auto)")
    plan.add_argument("--bucket-mb", type=float, help="gradient bucket size for the engine and DDP (default 25)")
    plan.add_argument("--threads", type=_integer, help="torch threads per rank (default: as for training)")
    plan.add_argument(
        "--sync-thread",
        type=_true_or_false,
        metavar="true|false",
        help="comm.sync_thread of the measured engine: a delayed sync's encoding, wait and decoding beside "
        "the step (default: auto, on where a rank has a core its torch threads leave free)",
    )
    plan.add_argument(
        "--compare-sync-thread",
        type=_true_or_false,
        metavar="true|false",
        help="the streaming phase measures each overlapped configuration without and with the sync thread, "
        "alternating within every repetition (<variant>_sync_thread; default false)",
    )
    plan.add_argument("--device", help="auto, cpu or cuda[:N] (default auto)")
    plan.add_argument(
        "--project-step-seconds",
        dest="projection_step_seconds",
        type=float,
        metavar="S",
        help="compute time per step for the projection instead of the measured one",
    )
    plan.add_argument(
        "--project-ranks-per-node",
        dest="projection_ranks_per_node",
        type=_integer,
        metavar="N",
        help="GPUs per node in the two-fabric projection (default 8)",
    )
    output = bench.add_argument_group("output")
    output.add_argument(
        "--out", metavar="FILE.json", help="write the results as JSON (schema: hpc_localsgd/bench/schema.json)"
    )
    output.add_argument(
        "--io-dir",
        metavar="DIR",
        help="where the checkpoint phase writes; every rank must see it "
        "(default: the folder of --out, else the current one)",
    )
    bench.set_defaults(handler=_bench)
    return parser


#: The exit status when the reader of stdout goes away (``hpc-localsgd inspect FILE | head -1``):
#: 128 + SIGPIPE, what a shell reports for a program that SIGPIPE ended, as it ends ``cat`` or ``grep``.
EXIT_BROKEN_PIPE = 141


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for the closed pipe is dropped at exit,
    where flushing it would print "Exception ignored ... BrokenPipeError" (Python's documented recipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            # Written out now, while a closed pipe can still be answered, rather than at exit.
            sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    # --help and --help-config print while parsing: main's flush covers them, so a closed pipe ends them quietly.
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        # One line, no traceback; rank 0 speaks for errors that every rank sees alike.
        if not exc.same_on_every_rank or _rank_from_environment() == 0:
            print_line(f"hpc-localsgd: error: {exc}", sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print_line("hpc-localsgd: interrupted", sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
