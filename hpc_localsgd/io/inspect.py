"""``hpc-localsgd inspect FILE.h5``: what a checkpoint or metrics file holds, and whether it is valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import yaml

from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .checkpoint import Checkpoint, CheckpointError
from .hdf5 import open_error_reason
from .metrics import MEMBERSHIP, MEMBERSHIP_DESCRIPTION, METRICS_FORMAT, membership_text


def _size(path: Path) -> int:
    return path.stat().st_size


def describe(file: str | Path, verify: bool = True) -> dict[str, Any]:
    path = Path(file)
    if not path.is_file():
        return {"file": str(path), "kind": "missing", "valid": False, "problem": "no such file"}
    try:
        with h5py.File(path, "r", locking=False) as f:
            kind = str(f.attrs.get("format", ""))
    except OSError as exc:
        return {
            "file": str(path),
            "kind": "unknown",
            "valid": False,
            "bytes": _size(path),
            "problem": f"'{path}' is not a readable HDF5 file ({open_error_reason(exc)})",
        }
    if kind == CHECKPOINT_FORMAT:
        return _describe_checkpoint(path, verify)
    if kind == METRICS_FORMAT:
        return _describe_metrics(path)
    return {
        "file": str(path),
        "kind": "foreign",
        "valid": False,
        "bytes": _size(path),
        "problem": f"'{path}' is not an hpc-localsgd checkpoint or metrics file (format attribute {kind!r})",
    }


def _describe_checkpoint(path: Path, verify: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"file": str(path), "kind": "checkpoint", "bytes": _size(path)}
    try:
        checkpoint = Checkpoint(path)
        if verify:
            checkpoint.verify()
    except CheckpointError as exc:
        return {**out, "valid": False, "problem": str(exc)}
    attrs = checkpoint.meta.attrs
    config = yaml.safe_load(checkpoint.meta.config) or {}
    with h5py.File(path, "r", locking=False) as f:
        stored = {"shared": sum(d.nbytes for d in f["shared"].values())}
        for rank in range(checkpoint.meta.world_size):
            group = f[f"ranks/{rank}/state"]
            stored[f"rank {rank}"] = sum(
                group[n].nbytes for n in group if group.get(n, getlink=True).__class__ is not h5py.SoftLink
            )
    return {
        **out,
        "valid": True,
        "verified": verify,
        "step": checkpoint.meta.step,
        "epoch": checkpoint.meta.epoch,
        "world_size": checkpoint.meta.world_size,
        "method": attrs.get("method"),
        "created": attrs.get("created"),
        "versions": json.loads(attrs.get("versions", "{}")),
        "tensor_bytes": stored,
        "config": config,
    }


def _membership_changes(f: h5py.File) -> list[str] | None:
    """Each change of the workers as the line the run printed (without its prefix); None for a file
    written before they were recorded."""
    if MEMBERSHIP not in f:
        return None
    group = f[MEMBERSHIP]
    rows = min(dataset.shape[0] for dataset in group.values())
    descriptions = group[MEMBERSHIP_DESCRIPTION].asstr()[:rows]
    return [
        membership_text(
            int(group["step"][i]),
            int(group["workers_before"][i]),
            int(group["workers_after"][i]),
            float(group["recovery_seconds"][i]),
            str(descriptions[i]),
        )
        for i in range(rows)
    ]


def _describe_metrics(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r", locking=False) as f:
        steps, evals = f["steps/step"][()], f["evals"]
        last_eval = (
            {name: float(evals[name][-1]) for name in ("step", "test_accuracy", "test_loss")}
            if evals["step"].shape[0]
            else None
        )
        changes = _membership_changes(f)
        return {
            "file": str(path),
            "kind": "metrics",
            "valid": True,
            "bytes": _size(path),
            "method": f.attrs.get("method"),
            "steps_logged": int(steps.shape[0]),
            "last_step": int(steps[-1]) if steps.shape[0] else 0,
            "evaluations": int(evals["step"].shape[0]),
            "last_evaluation": last_eval,
            "world": json.loads(f.attrs.get("world", "{}")),
            **({} if changes is None else {"membership_changes": changes}),
            "config": yaml.safe_load(f.attrs.get("config", "")) or {},
        }


def format_description(d: dict[str, Any]) -> str:
    lines = [f"{d['file']}: {d['kind']}, {'valid' if d.get('valid') else 'INVALID'}"]
    if not d.get("valid"):
        lines.append(f"  problem: {d.get('problem')}")
        return "\n".join(lines)
    skip = {"file", "kind", "valid", "config"}
    for key, value in d.items():
        if key in skip:
            continue
        if isinstance(value, list):  # one entry a line: a membership change each
            lines.append(f"  {key}: {len(value) or 'none'}")
            lines += [f"    {entry}" for entry in value]
        else:
            lines.append(f"  {key}: {value}")
    lines.append("  config:")
    lines += ["    " + line for line in yaml.safe_dump(d.get("config", {}), sort_keys=False).splitlines()]
    return "\n".join(lines)
