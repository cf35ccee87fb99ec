"""Hypothesis profiles for the suite (conformance/) and the harness tests (tests/): see conformance/profiles.py."""

import dsv3_conformance.profiles  # noqa: F401  (registers and loads the profiles)
