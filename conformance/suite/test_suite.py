"""Every registered check (conformance/checks/) on every selected backend.

The checks are library functions; this file only hands them to pytest. A check that does not apply to a
backend is skipped as such; one the backend could not run, in whole or in part, is skipped as not compared
and recorded: the suite's plugin (conformance/suite/plugin.py) then makes the session's verdict INCOMPLETE
(exit 1) unless `--allow-missing` names what is missing. A check that compared something and missed only allowed
parts passes, its missing parts still recorded and listed.
"""

from __future__ import annotations

import json

import pytest

from dsv3_conformance.backends import Unsupported
from dsv3_conformance.checks import CHECKS
from dsv3_conformance.verdict import Incomplete, NotApplicable, allowed

NOT_COMPARED = "not_compared"


def _param(check):
    marks = [getattr(pytest.mark, check.scale)] if check.scale != "fast" else []
    if check.needs_oracle:
        marks.append(pytest.mark.oracle)
    return pytest.param(check, marks=marks, id=check.key)


@pytest.mark.parametrize("check", [_param(check) for check in CHECKS.values()])
def test_check(check, backend, record_property, allowed_missing):
    record_property("check", check.key)
    record_property("component", check.component)
    record_property("backend", backend.name)
    try:
        check.run(backend)
    except NotApplicable as reason:
        pytest.skip(f"not applicable to {backend.name}: {reason}")
    except (Unsupported, Incomplete) as reason:
        missing = check.missing(reason)
        record_property(NOT_COMPARED, json.dumps([[m.what, m.part, m.reason] for m in missing]))
        if isinstance(reason, Incomplete) and reason.compared and all(allowed(m, allowed_missing) for m in missing):
            return  # passed: it compared something, and only what the user allowed was not compared
        pytest.skip(f"not compared on {backend.name}: {reason}")
    except Exception as error:  # a failure is reported as it is, but bounded: no megabytes of weights in a repr
        _bound(error)
        raise


BOUND = 4000


def _shorten(text: str) -> str:
    return text if len(text) <= BOUND else f"{text[:BOUND // 2]} ... [{len(text) - BOUND:,} characters cut] ... " \
                                           f"{text[-BOUND // 2:]}"


def _bound(error: BaseException) -> None:
    """Cut the message and the notes (hypothesis's falsifying example) of `error` to BOUND characters each."""
    if len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (_shorten(error.args[0]),)
    if getattr(error, "__notes__", None):
        error.__notes__ = [_shorten(note) for note in error.__notes__]
