"""Hypothesis profiles, one set for every way the checks run: pytest, `mutants` and `report`.

`ci` (the default) is derandomized: the same examples on every run, no shrinking (every example of a
model check compiles models; the first failure is reported as is). `dev` explores new examples;
`thorough` is for nightly runs. Pick one with HYPOTHESIS_PROFILE or pytest's --hypothesis-profile.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

PROFILES = ("ci", "dev", "thorough")
# Checks build and compile whole models; time per example is no sign of a problem. Examples a backend
# cannot run are rejected, which must not turn into a health-check failure either.
_COMMON = dict(deadline=None, report_multiple_bugs=False, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, max_examples=20, print_blob=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate], **_COMMON)
settings.register_profile("dev", max_examples=20, **_COMMON)
settings.register_profile("thorough", max_examples=400, **_COMMON)


def load(name: str | None = None) -> str:
    """Load profile `name` (default: $HYPOTHESIS_PROFILE, else ci); returns its name."""
    name = name or os.environ.get("HYPOTHESIS_PROFILE", "ci")
    settings.load_profile(name)
    return name


load()
