"""Every registered check (conformance/checks/) on every selected backend.

The checks are library functions; this file only hands them to pytest. A check the backend cannot run
(`Unsupported`) is skipped with its reason.
"""

from __future__ import annotations

import importlib.util

import pytest

from conformance.backends import Unsupported
from conformance.checks import CHECKS

_HAS_ORACLE = all(importlib.util.find_spec(name) for name in ("torch", "transformers"))


def _param(check):
    marks = [getattr(pytest.mark, check.scale)] if check.scale != "fast" else []
    if check.needs_oracle:
        marks += [pytest.mark.oracle, pytest.mark.skipif(not _HAS_ORACLE, reason="needs the oracle extra: pip install "
                                                                                 "-e '.[oracle]'")]
    return pytest.param(check, marks=marks, id=check.key)


@pytest.mark.parametrize("check", [_param(check) for check in CHECKS.values()])
def test_check(check, backend, record_property):
    record_property("check", check.key)
    record_property("component", check.component)
    try:
        check.run(backend)
    except Unsupported as reason:
        pytest.skip(f"{backend.name}: {reason}")
