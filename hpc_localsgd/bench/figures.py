"""The figures several phases report alike for a configuration they train: its rate against the two
no-communication limits, its share of time blocked in communication, its bytes per sample and where
its CPU goes. Written once, so that the same quantity reads the same in every phase."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .stats import Figure, Target, paired_ratios


def rate_figures(
    prefix: str,
    group: str,
    label: str,
    rate: list[float],
    bare_median: float,
    limit: list[float],
    target: Target | None = None,
) -> list[Figure]:
    """``<prefix>.samples_per_s``, ``.efficiency`` (over the median bare limit, measured before any
    communication library started; ``target`` is judged on it) and ``.efficiency_in_process`` (over the
    in-process limit ``limit`` of the same repetition)."""
    return [
        Figure(f"{prefix}.samples_per_s", group, f"{label} (global samples/s)", "samples/s", rate),
        Figure(
            f"{prefix}.efficiency",
            group,
            f"{label}: throughput over the median no-communication (bare) limit",
            "ratio",
            [r / bare_median for r in rate],
            target=target,
        ),
        Figure(
            f"{prefix}.efficiency_in_process",
            group,
            f"{label}: throughput over the in-process limit (paired)",
            "ratio",
            paired_ratios(rate, limit),
        ),
    ]


def comm_share_figure(prefix: str, group: str, label: str, share: list[float]) -> Figure:
    return Figure(
        f"{prefix}.comm_share",
        group,
        f"{label}: share of the step time blocked in communication (mean over ranks)",
        "fraction",
        share,
    )


def bytes_figure(figure_id: str, group: str, description: str, samples: Sequence[float], unit: str) -> Figure:
    """A byte count, exact by construction (the same on every repetition)."""
    return Figure(figure_id, group, description, unit, [float(v) for v in samples], exact=True)


def cpu_figures(
    prefix: str, group: str, label: str, cpu: Mapping[str, list[float]], threads: Mapping[str, str]
) -> list[Figure]:
    """``<prefix>.cpu_per_step.<thread>`` for each of ``threads`` (name: what runs on it) that was measured."""
    return [
        Figure(
            f"{prefix}.cpu_per_step.{thread}",
            group,
            f"{label}: CPU seconds a step of {what} (mean over ranks)",
            "s",
            cpu[thread],
        )
        for thread, what in threads.items()
        if thread in cpu
    ]
