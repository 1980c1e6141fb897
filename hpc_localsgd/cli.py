"""``hpc-localsgd VERB ...``: each verb parses its arguments and calls one function of the package."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any, TypeAlias

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
    if args.rejoin and (args.resume or args.overwrite):
        raise UserError("--rejoin joins a running job, which has its run dir: drop --resume and --overwrite")
    train(
        cfg,
        overwrite=args.overwrite,
        resume=args.resume,
        reshard=args.reshard,
        stop_at_step=args.stop_at_step,
        rejoin=args.rejoin,
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
    from .bench.options import BenchOptions
    from .bench.runner import run_bench

    # Every option's flag stores under the option's name, None when not given (quick or normal default).
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions) if f.name != "quick"}
    run_bench(BenchOptions.from_given(quick=args.quick, **given), command=["hpc-localsgd", *sys.argv[1:]])
    return 0


def _tokens(args: argparse.Namespace) -> int:
    from .config.fields import check_declared
    from .config.schema import TextConfig
    from .train.language_data import write_token_files

    # The ranges of data.text's settings, named by their flags.
    check_declared(TextConfig(args.val_fraction, args.max_bytes), name=lambda _, key: "--" + key.replace("_", "-"))
    corpus = write_token_files(args.source, args.out_dir, args.val_fraction, args.max_bytes, overwrite=args.overwrite)
    print(
        f"wrote {args.out_dir}: train.bin {corpus['train_tokens']} and val.bin {corpus['val_tokens']} uint16 tokens "
        f"from {corpus['files']} file(s) of {corpus['source']}, {corpus['bytes']} bytes, sha256 {corpus['digest']}"
    )
    return 0


def _bytes_or_none(text: str) -> int | None:
    return None if text in ("none", "null") else _integer(text)


# What each _add_<verb> adds its verb to.
Verbs: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpc-localsgd", description="Local SGD, post-local SGD and SlowMo on MPI ranks."
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    for add_verb in (_add_train, _add_inspect, _add_sweep, _add_report, _add_bench, _add_tokens):
        add_verb(verbs)
    return parser


def _add_train(verbs: Verbs) -> None:
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
        "--rejoin",
        action="store_true",
        help="replace a lost worker of the running job at MASTER_ADDR:MASTER_PORT (comm.on_worker_loss: continue): "
        "wait as a spare, join at a global sync with rank 0's model, optimizer state and step, and train on",
    )
    train.add_argument(
        "--stop-at-step",
        type=_integer,
        metavar="N",
        help="write a checkpoint after step N and stop, as a preempted job would",
    )
    train.set_defaults(handler=_train)


def _add_inspect(verbs: Verbs) -> None:
    inspect = verbs.add_parser("inspect", help="say what a checkpoint or metrics file holds")
    inspect.add_argument("file", help="a .h5 file written by hpc-localsgd")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument("--no-verify", action="store_true", help="skip reading every dataset's checksum")
    inspect.set_defaults(handler=_inspect)


def _add_sweep(verbs: Verbs) -> None:
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


def _add_report(verbs: Verbs) -> None:
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
        default=None,
        metavar="FRACTION",
        help="time to target: steps, bytes and projected time to reach this fraction of all-reduce's final test "
        "accuracy at the same task and worker count (default: 0.9); for language models a validation loss of "
        "(2 - FRACTION) x all-reduce's final loss (default: 0.98, i.e. its loss + 2%%)",
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


def _add_bench(verbs: Verbs) -> None:
    """One flag per field of ``BenchOptions``, generated from its declaration: the flag's name, the
    help, the parsing of its type (the range is checked with the options, so that a bad value gets
    the same one-line message from the command line and from Python) and the defaults in the help."""
    from .bench.options import BenchOptions

    bench = verbs.add_parser(
        "bench",
        help="measure averaging, throughput, SlowMo and checkpoints against their "
        "floors and baselines; run it once per rank (mpirun, srun)",
    )
    hints = typing.get_type_hints(BenchOptions)
    declared = dataclasses.fields(BenchOptions)
    quick_defaults = BenchOptions.quick_defaults()
    quick = {bench_flag(f): quick_defaults[f.name] for f in declared if f.name in quick_defaults}
    for f in declared:
        parsing = _bench_parsing(f.name, hints[f.name])
        bench.add_argument(bench_flag(f), dest=f.name, help=_bench_help(f, quick), **parsing)
    bench.set_defaults(handler=_bench)


def _add_tokens(verbs: Verbs) -> None:
    """Defaults from ``data.text``, so that the files hold the split that data.name text trains on."""
    from .config.schema import TextConfig

    defaults = TextConfig()
    tokens = verbs.add_parser(
        "tokens",
        help="write a text's bytes as token files (train.bin, val.bin of uint16 ids) for data.name tokens, "
        "split as data.name text splits it",
    )
    tokens.add_argument(
        "source",
        metavar="SOURCE",
        help="a text file, a folder (its files in sorted order) or 'stdlib' (the "
        "Python standard library's source, data.name text's built-in corpus)",
    )
    tokens.add_argument("out_dir", metavar="OUT_DIR", help="folder to write train.bin and val.bin in")
    tokens.add_argument(
        "--val-fraction",
        type=float,
        default=defaults.val_fraction,
        metavar="F",
        help=f"share held out for val.bin, the text's end (data.text.val_fraction; default {defaults.val_fraction})",
    )
    tokens.add_argument(
        "--max-bytes",
        type=_bytes_or_none,
        default=defaults.max_bytes,
        metavar="N|none",
        help=f"read at most N bytes (data.text.max_bytes; default {defaults.max_bytes}, none: all)",
    )
    tokens.add_argument("--overwrite", action="store_true", help="replace train.bin and val.bin already in OUT_DIR")
    tokens.set_defaults(handler=_tokens)


def bench_flag(f: dataclasses.Field) -> str:
    """The command-line flag of a bench option: its declared ``flag``, else ``--`` and its name with dashes."""
    return str(f.metadata.get("flag") or "--" + f.name.replace("_", "-"))


def _bench_help(f: dataclasses.Field, quick: dict[str, Any]) -> str:
    """The option's meaning, then its default and --quick's where that differs (for --quick itself, what
    it sets); ``quick``: --quick's defaults by flag."""
    from .config.fields import default_of, help_of

    meaning = help_of(f).rstrip(".")
    if f.name == "quick":
        return f"{meaning} ({', '.join(f'{name} {_shown(value)}' for name, value in quick.items())})"
    default = default_of(f)
    if default is None:
        return meaning
    flag = bench_flag(f)
    with_quick = f"; --quick: {_shown(quick[flag])}" if flag in quick else ""
    return f"{meaning} (default {_shown(default)}{with_quick})"


def _shown(value: Any) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _bench_parsing(name: str, hint: Any) -> dict[str, Any]:
    """How argparse reads an option of type ``hint``; an option not given stays None."""
    if name == "quick":  # a switch: it selects the other options' defaults, so it takes no value
        return {"action": "store_true"}
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return {"type": _int_list, "metavar": "N,..."} if item is int else {"type": _name_list, "metavar": "NAME,..."}
    kinds = {a for a in typing.get_args(hint) if a is not type(None)} or {hint}
    if bool in kinds:
        return {"type": _true_or_false, "metavar": "true|false"}
    if int in kinds:
        return {"type": _integer, "metavar": "N"}
    if float in kinds:
        return {"type": float, "metavar": "NUMBER"}
    return {}


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
            status = _run(argv)
        finally:
            # Written out now, while a closed pipe can still be answered, rather than at exit.
            sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    _end_after_membership_changes(status)
    return status


def _end_after_membership_changes(status: int) -> None:
    """A run that went on without a stopped member keeps that member's old process groups, which the
    interpreter's shutdown would wait for until Gloo's timeout: end now, everything being written."""
    from .comm.membership import end_process_now

    if end_process_now():
        sys.stderr.flush()
        os._exit(status)


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
