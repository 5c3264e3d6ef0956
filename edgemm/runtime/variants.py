"""Portable CPU bundles: which of a bundle's variants this host should run. Standard library only.

A CPU bundle compiled on one host may run on another (an AMX Xeon build, an AMD EPYC or Graviton device).
The manifest's ``variants`` list holds one entry per engine/precision the bundle carries, fastest first as
measured on the compiling host; each names the ISA features it needs to run at that speed
(``requires_any``: any one of them; empty = none) and the backend section its session opens. The last
variant is the fallback (ONNX Runtime), which runs everywhere, if slowly without its features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..text_numbers import ascii_int
from .manifest import BACKEND_FIELD_TYPES, register_section



@dataclass(frozen=True)
class Choice:
    index: int
    name: str
    reason: str
    warning: str | None = None                  # set when the host lacks what the variant needs for speed
    skipped: list[str] = field(default_factory=list)


def _package_of(backend: str) -> str:
    """The Python package a variant's backend needs on the running host (the backend's own name if unknown)."""
    from ..backends import registry
    from ..errors import InputError

    try:
        return registry.get(backend).python_package
    except InputError:
        return backend


def backend_installed(backend: str) -> bool:
    from ..backends import registry

    return backend in registry.names() and registry.get(backend).installed()


def choose_variant(variants: list[dict], isa: frozenset[str] | set[str], *, installed=backend_installed,
                   wanted: str | None = None) -> Choice:
    """The first variant whose backend is installed and whose ``requires_any`` the host meets; else the
    last installed one, with a warning that it runs without the features it was measured with.
    ``wanted``: a variant name the caller insists on (still warned about when the host lacks its features)."""
    skipped: list[str] = []
    runnable = []
    for index, variant in enumerate(variants):
        backend = variant["backend"]["name"]
        if not installed(backend):
            skipped.append(f"{variant['name']} (needs {_package_of(backend)}, not installed)")
            continue
        runnable.append(index)
    if wanted is not None:
        names = [v["name"] for v in variants]
        if wanted not in names:
            raise KeyError(wanted)
        candidates = [names.index(wanted)]
    else:
        candidates = runnable
    for index in candidates:
        need = set(variants[index].get("requires_any") or ())
        if not need or need & set(isa):
            have = sorted(need & set(isa))
            reason = f"host has {', '.join(have)}" if have else "needs no particular ISA feature"
            if wanted is not None:
                reason = f"asked for by name; {reason}"
            return Choice(index, variants[index]["name"], reason, None, skipped)
        if wanted is None:
            skipped.append(f"{variants[index]['name']} (needs one of {', '.join(sorted(need))})")
    if not candidates:
        raise LookupError("; ".join(skipped))
    index = candidates[-1]
    need = sorted(variants[index].get("requires_any") or ())
    warning = (f"variant {variants[index]['name']!r} was measured on a host with one of {', '.join(need)}; "
               f"this host has none, so it runs emulated and slower than the compile measured "
               f"(recompile on this host for a variant that fits it)")
    return Choice(index, variants[index]["name"], "no variant fits this host's ISA; running the fallback",
                  warning, skipped)


# Another variant the host runs at speed must have measured at least this much faster (p50 ratio) at a
# batch size for calls of that size to go to it: below ~10% the compile's timing noise decides.
ROUTE_GAIN = 0.9


def batch_routes(variants: list[dict], chosen: int, isa, *, installed=backend_installed) -> dict[int, int] | None:
    """{measured batch: variant index} when, at some batch the compile timed, another variant this host runs
    at speed measured >= 10% faster than the chosen one (issue #20: ORT INT8 won batch 1 and OpenVINO INT8
    batch 8 on one model); None when the chosen variant is best everywhere. Uses the compile host's
    ratios: they rank variants on hosts with the same features."""
    def runs_at_speed(v) -> bool:
        need = set(v.get("requires_any") or ())
        return installed(v["backend"]["name"]) and (not need or bool(need & set(isa)))

    def ratio(v, batch):
        value = ((v.get("measured") or {}).get("p50_ratio") or {}).get(batch)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None

    if not runs_at_speed(variants[chosen]):
        return None
    eligible = [i for i, v in enumerate(variants) if runs_at_speed(v)]
    routes = {}
    for batch in (variants[chosen].get("measured") or {}).get("p50_ratio") or {}:
        own = ratio(variants[chosen], batch)
        if own is None or ascii_int(batch) is None:
            continue
        timed = [(ratio(variants[i], batch), i) for i in eligible if ratio(variants[i], batch) is not None]
        best_ratio, best = min(timed)
        routes[ascii_int(batch)] = best if best_ratio <= ROUTE_GAIN * own else chosen
    return routes if len(set(routes.values())) > 1 else None


class BatchRoutedSession:
    """Sessions of several variants, each call run by the one measured fastest at the nearest timed batch
    size (nearest on a log scale: batch 2 goes with 1, 3 and up with 8)."""

    def __init__(self, sessions: dict[int, object], routes: dict[int, int], batch_input: str, primary: int):
        import math

        self._sessions, self._routes, self._batch_input = sessions, dict(sorted(routes.items())), batch_input
        self._log = math.log
        self.backend = getattr(sessions[primary], "backend", None)

    def index_for(self, batch: int) -> int:
        timed = min(self._routes, key=lambda b: abs(self._log(max(batch, 1)) - self._log(b)))
        return self._routes[timed]

    def run(self, feeds):
        return self._sessions[self.index_for(int(feeds[self._batch_input].shape[0]))].run(feeds)


def parse_variants(value, bad) -> list[dict]:
    """The ``variants`` manifest section, checked field by field: a non-empty list of {name (unique),
    backend (an object with a name, its fields typed as the top-level backend's), requires_any (feature
    names), measured (an object, optional)}. Registered as critical: an edgemm that ignored it would run only the fallback silently."""
    if not isinstance(value, list) or not value:
        raise bad("must be a non-empty list")
    names = set()
    for i, variant in enumerate(value):
        field_name = f"[{i}]"
        if not isinstance(variant, dict) or not isinstance(variant.get("name"), str) or variant["name"] in names:
            raise bad("must be an object with a unique name", field_name)
        names.add(variant["name"])
        backend = variant.get("backend")
        if not isinstance(backend, dict) or not isinstance(backend.get("name"), str):
            raise bad("must be an object with a backend name", f"{field_name}.backend")
        for key, kind in BACKEND_FIELD_TYPES.items():
            if backend.get(key) is not None and not isinstance(backend[key], kind):
                raise bad(f"must be a {kind.__name__}, not {type(backend[key]).__name__}",
                          f"{field_name}.backend.{key}")
        need = variant.get("requires_any", [])
        if not isinstance(need, list) or not all(isinstance(f, str) for f in need):
            raise bad("must be a list of ISA feature names", f"{field_name}.requires_any")
        # read by the batch routing and inspect as objects (values that are not numbers are skipped there)
        measured = variant.get("measured")
        if measured is not None and (not isinstance(measured, dict)
                                     or not isinstance(measured.get("p50_ratio") or {}, dict)):
            raise bad("must be an object, its p50_ratio an object of batch: ratio", f"{field_name}.measured")
    return value


register_section("variants", parse_variants, critical=True)
