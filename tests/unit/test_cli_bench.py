"""``hpc-localsgd bench``'s flags come from ``BenchOptions``: one per field, with the field's name,
meaning and default, parsed by its type; bad values end with the options' one-line message."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from hpc_localsgd.bench import BenchOptions
from hpc_localsgd.cli import bench_flag, build_parser, main

# The flags of the hand-written parser this one replaced (none may be renamed or lost), and the transformer's
# shape (--gpt-*) since.
FLAGS = {
    "--model",
    "--batch",
    "--image-size",
    "--classes",
    "--gpt-layers",
    "--gpt-heads",
    "--gpt-dim",
    "--gpt-seq-len",
    "--gpt-vocab",
    "--quick",
    "--repeats",
    "--warmup",
    "--steps",
    "--sync-periods",
    "--phases",
    "--precisions",
    "--streaming-variants",
    "--simulated-workers",
    "--channels-last",
    "--compile",
    "--baselines",
    "--ranks-per-worker",
    "--backend",
    "--bucket-mb",
    "--threads",
    "--sync-thread",
    "--compare-sync-thread",
    "--device",
    "--project-step-seconds",
    "--project-ranks-per-node",
    "--out",
    "--io-dir",
}


def bench_parser() -> argparse.ArgumentParser:
    verbs = next(a for a in build_parser()._actions if a.dest == "verb")
    return verbs.choices["bench"]  # type: ignore[index, return-value]


def bench_actions() -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in bench_parser()._actions if a.option_strings[0] != "-h"}


def normalized(text: str) -> str:
    return " ".join(text.split())


def test_every_option_has_its_flag_and_no_other_flag_exists() -> None:
    actions = bench_actions()
    assert set(actions) == FLAGS
    for f in dataclasses.fields(BenchOptions):
        action = actions[bench_flag(f)]
        assert action.dest == f.name
        # Not given stays None, so that --quick's defaults and the normal ones both yield to given values.
        assert action.default in (None, False)


def test_the_help_gives_each_options_meaning_and_default() -> None:
    quick = BenchOptions.quick_defaults()
    for f in dataclasses.fields(BenchOptions):
        text = normalized(bench_actions()[bench_flag(f)].help or "")
        assert text.startswith(normalized(f.metadata["help"]).rstrip(".")), f.name
        if f.default not in (None, False, dataclasses.MISSING) and f.name != "quick":
            shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default)
            assert f"(default {shown}" in text, (f.name, text)
        if f.name in quick:
            assert f"--quick: {quick[f.name]})" in text, (f.name, text)
    assert "(default 1,2,4,8,16,32)" in normalized(bench_actions()["--sync-periods"].help or "")
    assert "--compile" in bench_actions() and "(default false)" in (bench_actions()["--compile"].help or "")


def options_from(*argv: str) -> BenchOptions:
    args = build_parser().parse_args(["bench", *argv])
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions) if f.name != "quick"}
    return BenchOptions.from_given(quick=args.quick, **given)


def test_values_are_parsed_by_their_type() -> None:
    assert options_from("--quick") == BenchOptions.from_given(quick=True)
    assert options_from() == BenchOptions.from_given()
    options = options_from(
        "--quick",
        "--sync-periods",
        "4,1.6e1",
        "--baselines",
        "none",
        "--phases",
        "averaging,slowmo",
        "--compile",
        "true",
        "--sync-thread",
        "false",
        "--classes",
        "7",
        "--project-step-seconds",
        "0.5",
        "--bucket-mb",
        "2.5e1",
        "--simulated-workers",
        "8",
    )
    assert options.sync_periods == (4, 16) and options.baselines == () and options.phases == ("averaging", "slowmo")
    assert options.compile is True and options.sync_thread is False and options.num_classes == 7
    assert options.projection_step_seconds == 0.5 and options.bucket_mb == 25.0 and options.simulated_workers == 8
    assert options.model == "smallcnn" and options.repeats == 3  # the rest from --quick


def test_model_gpt_takes_its_shape_from_the_gpt_flags() -> None:
    options = options_from(
        "--model",
        "gpt",
        "--gpt-layers",
        "12",
        "--gpt-heads",
        "12",
        "--gpt-dim",
        "768",
        "--gpt-seq-len",
        "1024",
        "--gpt-vocab",
        "50304",
        "--batch",
        "8",
    )
    assert (options.gpt_layers, options.gpt_heads, options.gpt_dim) == (12, 12, 768)
    assert (options.gpt_seq_len, options.gpt_vocab, options.batch) == (1024, 50304, 8)
    assert options.model == "gpt" and options.tokens_per_sample == 1024
    options.validate()
    # Not given: configs/lm/demo.yaml's byte-level transformer; a classifier has no tokens.
    default = options_from("--quick", "--model", "gpt")
    shape = (default.gpt_layers, default.gpt_heads, default.gpt_dim, default.gpt_seq_len, default.gpt_vocab)
    assert shape == (4, 4, 128, 64, 256) and default.tokens_per_sample == 64
    assert options_from("--quick").tokens_per_sample is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--model", "gpt", "--gpt-dim", "100", "--gpt-heads", "3"],
            "--gpt-dim: 100 is not a multiple of --gpt-heads (3)",
        ),
        (["--model", "gpt", "--gpt-vocab", "100"], "--gpt-vocab: must be >= 256, got 100"),
        (["--model", "gpt", "--gpt-seq-len", "0"], "--gpt-seq-len: must be >= 1, got 0"),
        (["--repeats", "0"], "--repeats: must be >= 1, got 0"),
        (["--classes", "1"], "--classes: must be >= 2, got 1"),
        (["--project-step-seconds", "0"], "--project-step-seconds: must be > 0, got 0.0"),
        (
            ["--backend", "nccl"],
            "--backend: must be one of 'auto' | 'horovod' | 'mpi' | 'torch' | 'single', got 'nccl'",
        ),
        (["--sync-periods", "4,0"], "--sync-periods: must be positive integers, got 4,0"),
        (["--phases", "averaging,nosuch"], "--phases: unknown phase 'nosuch'; choose from "),
        (["--simulated-workers", "1"], "--simulated-workers: must be >= 2, got 1"),
    ],
)
def test_a_bad_value_ends_with_the_options_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"hpc-localsgd: error: {message}"), err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--batch", "x"], "argument --batch: expected an integer, got 'x'"),
        (["--sync-periods", "4,x"], "argument --sync-periods: expected comma-separated integers, got '4,x'"),
        (["--compile", "maybe"], "argument --compile: expected true or false, got 'maybe'"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_while_parsing(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bench", "--quick", *argv])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"hpc-localsgd bench: error: {message}"
