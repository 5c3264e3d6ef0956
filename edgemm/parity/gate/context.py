"""What a baseline is valid for (backend, target, precision) and what changed since it was recorded
(source, files, versions, host): a baseline from another context is refused, another host skips latency."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ...errors import InputError
from ...precision import label_of

if TYPE_CHECKING:
    from ...runtime.manifest import Manifest


def gpu_info() -> list[str]:
    """GPU names without importing CUDA: the NVIDIA driver's /proc entries, or a Jetson's board model."""
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("Model:"):
                names.append(line.split(":", 1)[1].strip())
    board = Path("/proc/device-tree/model")
    if not names and board.is_file():
        names.append(board.read_text(errors="replace").strip("\x00\n "))
    return names


def bundle_context(manifest: "Manifest") -> dict:
    """What a baseline is only valid for (backend, target, precision) plus what is worth reporting."""
    from ...hostinfo import cpu_info, versions

    files = json.dumps(dict(manifest.files), sort_keys=True).encode()
    return {
        "backend": manifest.backend.name,
        "target": manifest.target.name,
        "precision": manifest.precision.label,
        "bundle": {"name": manifest.name, "files_sha256": hashlib.sha256(files).hexdigest(),
                   "source_sha256": manifest.source.sha256 if manifest.source else None},
        "compiled_with": dict(manifest.versions),
        "runtime_versions": versions(),
        "host": {"cpu": cpu_info(), "gpu": gpu_info()},
    }


def check_context(recorded: Mapping, now: Mapping, baseline_path: Path) -> tuple[list[str], bool]:
    """Refuse a baseline from another backend/target/precision. Returns (changes worth reporting,
    same_host), where same_host says whether latency ratios from both runs can be compared."""
    for key in ("backend", "target", "precision"):
        # Precision by label: a baseline of an older bundle holds "mixed:fp32+int8", the manifest now a section.
        same = (label_of(recorded.get(key)) == label_of(now.get(key)) if key == "precision"
                else recorded.get(key) == now.get(key))
        if not same:
            raise InputError(f"baseline was recorded for {key} {recorded.get(key)!r}, this bundle is "
                             f"{now.get(key)!r}", file=baseline_path, field=f"context.{key}",
                             fix="compare against a baseline recorded for this backend/target/precision, or "
                                 "record one with --save-baseline")
    changes = []
    rb, nb = recorded.get("bundle", {}), now.get("bundle", {})
    if rb.get("source_sha256") != nb.get("source_sha256"):
        changes.append("source model changed since the baseline")
    if rb.get("files_sha256") != nb.get("files_sha256"):
        changes.append("bundle files changed since the baseline")
    for section, label in (("compiled_with", "compiled with"), ("runtime_versions", "running on")):
        old, new = recorded.get(section) or {}, now.get(section) or {}
        for dist in sorted(set(old) | set(new)):
            if old.get(dist) != new.get(dist):
                changes.append(f"{label} {dist} {old.get(dist)} -> {new.get(dist)}")
    rh, nh = recorded.get("host", {}), now.get("host", {})
    same_host = (rh.get("cpu", {}).get("model") == nh.get("cpu", {}).get("model")
                 and rh.get("cpu", {}).get("int8_isa") == nh.get("cpu", {}).get("int8_isa")
                 and list(rh.get("gpu") or []) == list(nh.get("gpu") or []))
    if not same_host:
        changes.append(f"host changed: {_host_label(rh)} -> {_host_label(nh)}")
    return changes, same_host


def _host_label(host: Mapping) -> str:
    gpu = ", ".join(host.get("gpu") or [])
    return (host.get("cpu") or {}).get("model", "?") + (f" + {gpu}" if gpu else "")
