"""For the suite (conformance/) and the harness tests (tests/): the hypothesis profiles (conformance/profiles.py),
each pytest worker's share of the cores (conformance/cores.py), and the longest tests started first."""

import pytest

import dsv3_conformance.profiles  # noqa: F401  (registers and loads the profiles)
from dsv3_conformance import cores

cores.share_with_pytest_workers()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "long: runs a minute or more on 2 cores; started first, so that the workers "
                                       "finish together")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: otherwise collection order
