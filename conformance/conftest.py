"""Options of the conformance suite: which backends to check, and at which scale."""

from __future__ import annotations

from pathlib import Path

import pytest

from conformance.backends import DEFAULT_BACKENDS, Backend, resolve_backends
from conformance.format.errors import BadInput
from conformance.paths import GOLDEN_DIR


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dsv3-conformance")
    group.addoption("--backend", default=",".join(DEFAULT_BACKENDS),
                    help="comma-separated backends: built-in names, entry-point names or package.module:object "
                         f"(default: {','.join(DEFAULT_BACKENDS)})")
    group.addoption("--scale", choices=("fast", "small", "full"), default="fast",
                    help="fast: the CI tier; small and full add checks on larger models")
    group.addoption("--checkpoint", default=None, help="a real checkpoint folder for the full tier's layer check")
    group.addoption("--layer", type=int, default=None, help="which layer of --checkpoint (default: the first MoE)")


def selected_backends(config: pytest.Config) -> list[Backend]:
    try:
        return resolve_backends(config.getoption("--backend"))
    except BadInput as error:
        raise pytest.UsageError(str(error)) from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        backends = selected_backends(metafunc.config)
        metafunc.parametrize("backend", backends, ids=[backend.name for backend in backends])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order = ["fast", "small", "full"]
    chosen = order.index(config.getoption("--scale"))
    for item in items:
        for scale in order[1:]:
            if item.get_closest_marker(scale) and order.index(scale) > chosen:
                item.add_marker(pytest.mark.skip(reason=f"needs --scale {scale}"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "small: runs with --scale small or full")
    config.addinivalue_line("markers", "full: runs with --scale full")
    config.addinivalue_line("markers", "oracle: needs torch and transformers (the oracle extra)")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN_DIR
