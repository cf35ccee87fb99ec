"""Hypothesis profiles shared by the suite (conformance/) and the harness tests (tests/).

`ci` (the default) is derandomized: the same examples on every run. `dev` explores new examples;
`thorough` is for nightly runs. Pick one with --hypothesis-profile or HYPOTHESIS_PROFILE.
"""

import os

from hypothesis import HealthCheck, Phase, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# No shrinking in CI: every example of a model test compiles models, and the first failure is reported as is.
settings.register_profile("ci", derandomize=True, max_examples=20, print_blob=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate], **_COMMON)
settings.register_profile("dev", max_examples=20, **_COMMON)
settings.register_profile("thorough", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
