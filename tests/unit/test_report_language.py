"""``hpc-localsgd report`` on language-model runs: metrics files written by the real MetricsWriter with the
``language`` attribute and validation losses chosen here. The table's loss, bits per byte and perplexity,
the grouping by corpus, the trade-off (lower loss is better: the Pareto front and the target flip) and the
figures' loss axes, each against values computed here from the rows; classifier runs beside them as before.

Runs: 40 steps, evaluations at 10, 20, 30, 40, a sync of 1000 bytes every H steps (every step for
all-reduce); the validation loss falls linearly by 0.25 nats per evaluation to the run's final loss.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from hpc_localsgd.config import config_to_yaml, load_config
from hpc_localsgd.errors import UserError
from hpc_localsgd.io.metrics import LANGUAGE_ATTR, MetricsWriter
from hpc_localsgd.report import write_report
from hpc_localsgd.report.collect import collect_runs
from hpc_localsgd.report.plots import (
    FINAL_LOSS_AXIS_LABEL,
    LOSS_AXIS_LABEL,
    UNIGRAM_LABEL,
    plot_accuracy_vs_sync_period,
    plot_curves,
)
from hpc_localsgd.report.table import CSV_COLUMNS, LANGUAGE_CSV_COLUMNS, group_runs, summarise
from hpc_localsgd.report.tradeoff import load_timing, plot_tradeoff, tradeoff_rows
from tests.unit.test_drift_report import add_syncs, sync_rows
from tests.unit.test_report import write_run
from tests.unit.test_tradeoff import BENCH

TOTAL_STEPS = 40
EVAL_STEPS = (10, 20, 30, 40)
BYTES_PER_ROUND = 1000
SEQ_LEN = 64
BATCH = 8  # sequences per worker and step
ENTROPY = 3.125  # the corpus's unigram entropy, nats per token
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def language_attr(digest: str, bytes_per_token: int | None) -> dict[str, Any]:
    """The ``language`` attribute as the training loop writes it."""
    return {
        "tokens_per_sample": SEQ_LEN,
        "bytes_per_token": bytes_per_token,
        "corpus": {
            "source": "stdlib" if bytes_per_token else "tokens.bin",
            "files": 3,
            "bytes": 123_456,
            "digest": digest,
            "train_tokens": 111_110,
            "val_tokens": 12_346,
            "bytes_per_token": bytes_per_token,
            "unigram_entropy": ENTROPY,
        },
    }


def lm_loss(final: float, step: int) -> float:
    return final + 0.25 * (TOTAL_STEPS - step) / 10


def write_lm_run(
    path: Path,
    method: str,
    sync_period: int,
    workers: int,
    seed: int,
    final_loss: float,
    accuracy: float = 0.5,
    digest: str = DIGEST_A,
    bytes_per_token: int | None = 1,
    extra: tuple[str, ...] = (),
) -> None:
    """A GPT run on byte-level text (token files without bytes per token): its validation loss falls to
    ``final_loss``, its next-token accuracy climbs linearly to ``accuracy``."""
    data = ["data.name=text"] if bytes_per_token else ["data.name=tokens", "data.path=/corpus"]
    overrides = [f"seed={seed}", f"algorithm.method={method}", "model.name=gpt", f"model.gpt.seq_len={SEQ_LEN}"]
    if method != "allreduce":
        overrides.append(f"algorithm.sync_period={sync_period}")
    if method == "post_local_sgd":
        overrides.append("algorithm.switch_step=10")
    cfg = load_config(None, overrides + data + [f"data.batch_size={BATCH}", *extra])
    path.mkdir(parents=True)
    attrs = {
        "config": config_to_yaml(cfg),
        "world": {"size": workers},
        "total_steps": TOTAL_STEPS,
        "global_batch": BATCH * workers,
        LANGUAGE_ATTR: language_attr(digest, bytes_per_token),
    }
    writer = MetricsWriter(path / "metrics.h5", attrs, flush_seconds=3600)
    period = 1 if method == "allreduce" else sync_period
    for step in EVAL_STEPS:
        rounds = step // period
        writer.log_eval(
            step=step,
            epoch=step / 10,
            train_loss=lm_loss(final_loss, step) - 0.1,
            test_loss=lm_loss(final_loss, step),
            test_accuracy=accuracy * step / TOTAL_STEPS,
            wall_seconds=0.5 * step,
            comm_seconds=0.1 * step,
            bytes_sent=rounds * BYTES_PER_ROUND,
            sync_rounds=rounds,
            global_bytes_sent=rounds * BYTES_PER_ROUND,
            global_sync_rounds=rounds,
        )
    writer.close()


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def test_table_holds_loss_and_bits_per_byte_over_seeds(tmp_path: Path) -> None:
    losses = {"allreduce": (1.5, 1.75), "local_sgd": (2.0, 2.5)}
    for method, finals in losses.items():
        for seed, final in enumerate(finals):
            write_lm_run(tmp_path / "runs" / f"{method}-s{seed}", method, 4, 2, seed, final, accuracy=0.4 + seed / 10)
    out = tmp_path / "report"
    write_report([tmp_path / "runs"], out, say=None)
    rows = {row["method"]: row for row in read_csv(out / "results.csv")}
    assert list(rows["all-reduce"]) == list(CSV_COLUMNS + LANGUAGE_CSV_COLUMNS)
    for method, label in (("allreduce", "all-reduce"), ("local_sgd", "local SGD")):
        row, finals = rows[label], losses[method]
        mean, std = statistics.fmean(finals), statistics.stdev(finals)
        assert row["task"] == "text/gpt (corpus aaaaaaaa)"
        assert float(row["val_loss_nats_per_token_mean"]) == mean
        assert float(row["val_loss_nats_per_token_std"]) == std
        # Byte-level text: one byte per token, so bits per byte = loss / ln 2.
        assert float(row["bits_per_byte_mean"]) == mean / math.log(2) / 1
        assert float(row["bits_per_byte_std"]) == std / math.log(2) / 1
        assert row["perplexity"] == ""
        assert row["tokens_per_step"] == str(BATCH * 2 * SEQ_LEN)
        assert float(row["test_accuracy_mean"]) == pytest.approx(0.45)  # next-token accuracy
    md = (out / "results.md").read_text()
    assert "| val loss (nats/token, lower is better) | bits per byte (lower is better) | next-token accuracy" in md
    # local SGD: losses 2.0 and 2.5 -> 2.250 ± 0.354 nats, 3.246 ± 0.510 bits per byte.
    assert "| local SGD | 4 | 2 | 2 | 2.250 ± 0.354 | 3.246 ± 0.510 | 45.00 ± 7.07 |" in md
    assert "digest `" + DIGEST_A + "`" in md and f"unigram entropy {ENTROPY:.3f} nats/token" in md
    assert "perplexity" not in md.split("## ")[1]


def test_perplexity_where_bytes_per_token_are_unknown(tmp_path: Path) -> None:
    finals = (3.0, 3.5)
    for seed, final in enumerate(finals):
        write_lm_run(tmp_path / "runs" / f"s{seed}", "local_sgd", 8, 4, seed, final, bytes_per_token=None)
    (row,) = summarise(collect_runs([tmp_path / "runs"]))
    assert row.key.task == "tokens/gpt (corpus aaaaaaaa)"
    assert row.bits_per_byte is None
    # exp of the mean loss over seeds: the seeds' geometric mean perplexity.
    assert row.perplexity == math.exp(statistics.fmean(finals))
    out = tmp_path / "report"
    write_report([tmp_path / "runs"], out, say=None)
    (line,) = read_csv(out / "results.csv")
    assert float(line["perplexity"]) == math.exp(3.25) and line["bits_per_byte_mean"] == ""
    md = (out / "results.md").read_text()
    assert "| perplexity (lower is better) |" in md and "bits per byte" not in md.split("## ")[1]
    assert f"| 3.250 ± 0.354 | {math.exp(3.25):.2f} |" in md


def test_classifier_runs_beside_language_runs_report_as_before(tmp_path: Path) -> None:
    write_run(tmp_path / "runs" / "cnn", "local_sgd", 4, 2, 0)
    write_lm_run(tmp_path / "runs" / "gpt", "local_sgd", 4, 2, 0, 2.0)
    alone = tmp_path / "alone"
    write_report([tmp_path / "runs" / "cnn"], alone, say=None)
    assert (alone / "results.csv").read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    out = tmp_path / "report"
    written = {p.name for p in write_report([tmp_path / "runs"], out, say=None)}
    cnn, gpt = read_csv(out / "results.csv")
    (classifier,) = read_csv(alone / "results.csv")
    assert {k: v for k, v in cnn.items() if k in CSV_COLUMNS} == classifier
    assert all(cnn[column] == "" for column in LANGUAGE_CSV_COLUMNS)
    assert gpt["task"] == "text/gpt (corpus aaaaaaaa)" and float(gpt["val_loss_nats_per_token_mean"]) == 2.0
    md = (out / "results.md").read_text()
    section = md.split("## digits/smallcnn")[1].split("## ")[0]
    assert "| test accuracy (%) |" in section and "loss" not in section
    assert (alone / "results.md").read_text().split("## ")[1] == "digits/smallcnn" + section.rstrip("\n") + "\n"
    assert {"accuracy_vs_H-digits-smallcnn.png", "loss_vs_H-text-gpt-corpus-aaaaaaaa.svg"} <= written
    assert "accuracy_vs_H-text-gpt-corpus-aaaaaaaa.png" not in written


def test_runs_on_two_corpora_are_not_seeds_of_one_configuration(tmp_path: Path) -> None:
    write_lm_run(tmp_path / "runs" / "a0", "local_sgd", 4, 2, 0, 2.0)
    write_lm_run(tmp_path / "runs" / "a1", "local_sgd", 4, 2, 1, 2.5)
    write_lm_run(tmp_path / "runs" / "b0", "local_sgd", 4, 2, 0, 3.0, digest=DIGEST_B)
    warnings: list[str] = []
    runs = collect_runs([tmp_path / "runs"], warn=warnings.append)
    assert warnings == []  # seed 0 on corpus b is not a rerun of seed 0 on corpus a
    groups = {key.task: [run.path.parent.name for run in members] for key, members in group_runs(runs).items()}
    assert groups == {"text/gpt (corpus aaaaaaaa)": ["a0", "a1"], "text/gpt (corpus bbbbbbbb)": ["b0"]}
    losses = {row.key.task: row.loss_mean for row in summarise(runs)}
    assert losses == {"text/gpt (corpus aaaaaaaa)": 2.25, "text/gpt (corpus bbbbbbbb)": 3.0}


@pytest.fixture
def lm_tradeoff_dir(tmp_path: Path) -> Path:
    """4 workers: all-reduce (final loss 2.0), local SGD H=2 (2.1) and H=8 (2.5), post-local SGD H=8 (2.2,
    the same traffic as local SGD H=8). Next-token accuracy ranks them the other way round, so a front
    drawn on accuracy would be a different one."""
    root = tmp_path / "runs"
    write_lm_run(root / "ar", "allreduce", 1, 4, 0, 2.0, accuracy=0.30)
    write_lm_run(root / "h2", "local_sgd", 2, 4, 0, 2.1, accuracy=0.35)
    write_lm_run(root / "h8", "local_sgd", 8, 4, 0, 2.5, accuracy=0.50)
    write_lm_run(root / "post8", "post_local_sgd", 8, 4, 0, 2.2, accuracy=0.40)
    return root


def test_pareto_front_and_target_of_lower_loss(lm_tradeoff_dir: Path, tmp_path: Path) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(BENCH))
    runs = collect_runs([lm_tradeoff_dir])
    rows = {(r.key.method, r.key.sync_period): r for r in tradeoff_rows(runs, load_timing(bench))}
    # Projected (as in test_tradeoff): all-reduce 0.70 s, H=2 0.55 s, both H=8 0.4375 s. Post-local SGD H=8
    # is as fast as local SGD H=8 with a lower loss: local SGD H=8 is the only point off the front.
    assert rows["all-reduce", 1].seconds == pytest.approx(0.70)
    assert rows["local SGD", 8].seconds == pytest.approx(rows["post-local SGD", 8].seconds)
    assert {key for key, row in rows.items() if not row.pareto} == {("local SGD", 8)}
    # Default target for a language model: all-reduce's final loss + 2 % = 2.04, reached by all-reduce alone
    # (at its last evaluation); no accuracy target.
    assert {r.target_loss for r in rows.values()} == {(2 - 0.98) * 2.0}
    assert {r.target_accuracy for r in rows.values()} == {None}
    assert {key: r.reached for key, r in rows.items()} == {key: int(key[0] == "all-reduce") for key in rows}
    # --target 0.8: loss at most 1.2 × 2.0 = 2.4. Losses at step 30 are final + 0.25: all-reduce 2.25 and
    # H=2 2.35 reach it there, post-local SGD H=8 at step 40 (2.2; 2.45 before), local SGD H=8 never (2.5).
    rows = {(r.key.method, r.key.sync_period): r for r in tradeoff_rows(runs, load_timing(bench), 0.8)}
    assert {key: r.steps_to_target for key, r in rows.items()} == {
        ("all-reduce", 1): 30,
        ("local SGD", 2): 30,
        ("local SGD", 8): None,
        ("post-local SGD", 8): 40,
    }
    # P = 4: a round costs 6 ms of latency, a byte 1.5 µs; compute 10 ms per step.
    assert rows["local SGD", 2].seconds_to_target == pytest.approx(0.3 + 15 * 0.006 + 15_000 * 1.5e-6)
    assert rows["post-local SGD", 8].seconds_to_target == pytest.approx(0.4 + 5 * 0.006 + 5_000 * 1.5e-6)
    out = tmp_path / "report"
    write_report([lm_tradeoff_dir], out, say=None, timing=bench)
    table = {(r["method"], r["H"]): r for r in read_csv(out / "tradeoff.csv")}
    assert table["local SGD", "8"]["pareto"] == "0" and table["all-reduce", "1"]["pareto"] == "1"
    assert float(table["post-local SGD", "8"]["val_loss_nats_per_token_mean"]) == 2.2
    assert float(table["all-reduce", "1"]["target_val_loss_nats_per_token"]) == (2 - 0.98) * 2.0
    assert table["all-reduce", "1"]["target_accuracy"] == ""
    md = (out / "tradeoff.md").read_text()
    assert "target loss 1.02 × all-reduce SGD's final validation loss" in md and "(+2 %)" in md
    assert "| method | H | workers | val loss (nats/token, lower is better) | projected time |" in md
    assert "| all-reduce | 1 | 4 | 2.000 ± – | 0.7 s | 0.3 s | yes | 1/1 | 40 |" in md
    assert "Target: 90 %" not in md  # no classifier here


def test_each_run_is_measured_against_the_all_reduce_run_of_its_inner_optimizer(tmp_path: Path) -> None:
    """All-reduce with AdamW (final loss 2.0) and with Muon (1.5) inside: the report labels them apart, and a
    local SGD run's target is the all-reduce run's that trained with its own inner optimizer (+ 2 %)."""
    root = tmp_path / "runs"
    adamw, muon = ("optim.name=adamw",), ("optim.name=muon",)
    write_lm_run(root / "ar-adamw", "allreduce", 1, 4, 0, 2.0, extra=adamw)
    write_lm_run(root / "ar-muon", "allreduce", 1, 4, 0, 1.5, extra=muon)
    write_lm_run(root / "h8-adamw", "local_sgd", 8, 4, 0, 2.03, extra=adamw)
    write_lm_run(root / "h8-muon", "local_sgd", 8, 4, 0, 1.52, extra=muon)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(BENCH))
    rows = {(r.key.method, r.key.sync_period): r for r in tradeoff_rows(collect_runs([root]), load_timing(bench))}
    targets = {key: r.target_loss for key, r in rows.items()}
    assert targets == {
        ("all-reduce (name=adamw)", 1): (2 - 0.98) * 2.0,
        ("all-reduce (name=muon)", 1): (2 - 0.98) * 1.5,
        ("local SGD (name=adamw)", 8): (2 - 0.98) * 2.0,
        ("local SGD (name=muon)", 8): (2 - 0.98) * 1.5,
    }
    assert {key: r.reached for key, r in rows.items()} == dict.fromkeys(rows, 1)


def test_figures_are_written_with_loss_axes_that_say_lower_is_better(lm_tradeoff_dir: Path, tmp_path: Path) -> None:
    for name, h in (("h2", 2), ("h8", 8)):
        add_syncs(lm_tradeoff_dir / name / "metrics.h5", sync_rows(h, 0, outer=False))
    out = tmp_path / "report"
    written = {p.name for p in write_report([lm_tradeoff_dir], out, say=None, tradeoff=True)}
    for name in ("loss_vs_H", "curves-W4", "drift-W4", "tradeoff"):  # drift: the syncs table is the same
        assert {f"{name}.png", f"{name}.svg"} <= written
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lower is better" in LOSS_AXIS_LABEL and "lower is better" in FINAL_LOSS_AXIS_LABEL
    runs = collect_runs([lm_tradeoff_dir])
    figures = tmp_path / "figures"
    figures.mkdir()
    by_h = plot_accuracy_vs_sync_period(summarise(runs), [figures / "h.png"], "t")
    assert by_h.axes[0].get_ylabel() == FINAL_LOSS_AXIS_LABEL
    # all-reduce's line sits at its final loss, not at its accuracy.
    assert [list(line.get_ydata()) for line in by_h.axes[0].lines if line.get_label() == "all-reduce"] == [[2.0, 2.0]]
    curves = plot_curves(group_runs(runs), [figures / "c.png"], "t")
    loss_axes = curves.axes[0]
    assert loss_axes.get_ylabel() == LOSS_AXIS_LABEL
    unigram = [line for line in loss_axes.lines if line.get_label() == UNIGRAM_LABEL]
    assert len(unigram) == 1 and list(unigram[0].get_ydata()) == [ENTROPY, ENTROPY]
    assert unigram[0].get_linestyle() == "--"
    tokens_axes = curves.axes[len(curves.axes) // 2 + 1]  # bottom row, second column: tokens trained
    assert tokens_axes.get_xlabel() == "tokens trained"
    tokens = {float(x) for line in curves.axes[1].lines if line.get_label() != UNIGRAM_LABEL for x in line.get_xdata()}
    assert tokens == {float(step * BATCH * 4 * SEQ_LEN) for step in EVAL_STEPS}
    tradeoff = plot_tradeoff(tradeoff_rows(runs, load_timing(None)), [figures / "t.png"], "t", load_timing(None))
    assert tradeoff.axes[0].get_ylabel() == FINAL_LOSS_AXIS_LABEL
    front = [line for line in tradeoff.axes[0].lines if line.get_label() == "Pareto front"]
    assert np.all(np.diff(front[0].get_ydata()) < 0)  # slower points on the front have lower loss


def test_an_unreadable_language_attribute_names_the_file(tmp_path: Path) -> None:
    write_lm_run(tmp_path / "run", "local_sgd", 4, 2, 0, 2.0)
    with h5py.File(tmp_path / "run" / "metrics.h5", "a") as f:
        f.attrs[LANGUAGE_ATTR] = "{not json"
    with pytest.raises(UserError, match=r"metrics.h5': unreadable language attribute \(JSONDecodeError\)"):
        collect_runs([tmp_path / "run"])
