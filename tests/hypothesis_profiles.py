"""How hypothesis runs in this repository (loaded by tests/conftest.py before any test module).

"ci" (the default, what `.ci/run` gets): derandomized, no example database. Every run of a given checkout
draws the same examples, so CI fails only on a change that broke something, never on a random example a
previous commit could have hit too (a fuzz escape found by chance in CI once blocked an unrelated landing).
Hypothesis documents the limit: examples change when hypothesis, Python or the test itself changes.

"explore" (local hunting, never CI): `EDGEMM_HYPOTHESIS=explore python -m pytest ...` draws fresh random
examples every run, `EDGEMM_FUZZ_SCALE` (default 20) times as many. Every escape it finds gets a fixed
regression test (an @example or a plain test) before its fix lands, so CI keeps it covered deterministically.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("explore", derandomize=False, **_COMMON)

PROFILE = os.environ.get("EDGEMM_HYPOTHESIS", "ci")
if PROFILE not in ("ci", "explore"):
    raise RuntimeError(f"EDGEMM_HYPOTHESIS={PROFILE!r}: use 'ci' (default) or 'explore'")
SCALE = int(os.environ.get("EDGEMM_FUZZ_SCALE", "20")) if PROFILE == "explore" else 1
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """``n`` examples in CI, ``n * EDGEMM_FUZZ_SCALE`` when exploring."""
    return n * SCALE
