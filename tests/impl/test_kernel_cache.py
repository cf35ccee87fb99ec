"""The native kernel is loaded only from a cache this user owns (impl/matvec.py): created private, refused when
another user owns it or may write it, a library loaded only with the sha256 recorded when it was built, and named
by the compiler's version and the CPU's identity."""

from __future__ import annotations

import os
import stat

import pytest

from dsv3_conformance.impl import matvec


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "kernels"
    monkeypatch.setenv("DSV3_KERNEL_CACHE", str(folder))
    return folder


def test_a_missing_cache_is_created_private(cache):
    assert matvec.private_cache() == cache
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_a_cache_others_may_write_is_refused(cache, mode):
    cache.mkdir()
    cache.chmod(mode)
    with pytest.raises(matvec.KernelCacheError, match="writable by its group or by others"):
        matvec.private_cache()


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_a_cache_another_user_owns_is_refused(cache):
    cache.mkdir(mode=0o700)
    os.chown(cache, 65534, 65534)
    with pytest.raises(matvec.KernelCacheError, match="is owned by user 65534"):
        matvec.private_cache()


def _library(cache, data: bytes = b"\x7fELF built"):
    cache.mkdir(mode=0o700, exist_ok=True)
    library = cache / "matvec-0123.so"
    library.write_bytes(data)
    record = cache / "matvec-0123.so.sha256"
    record.write_text(matvec._sha256(library) + "\n")
    return library, record


def test_a_library_with_its_recorded_sha256_is_taken(cache):
    library, _ = _library(cache)
    assert matvec.verified(library) == library


def test_a_library_changed_after_its_build_is_refused(cache):
    library, _ = _library(cache)
    library.write_bytes(b"\x7fELF planted by someone else")
    with pytest.raises(matvec.KernelCacheError, match="sha256 differs"):
        matvec.verified(library)


def test_a_library_without_its_record_is_refused(cache):
    library, record = _library(cache)
    record.unlink()
    with pytest.raises(matvec.KernelCacheError, match="is missing"):
        matvec.verified(library)


def test_a_library_others_may_write_is_refused(cache):
    library, _ = _library(cache)
    library.chmod(0o766)
    with pytest.raises(matvec.KernelCacheError, match="writable by its group or by others"):
        matvec.verified(library)


def test_the_name_holds_the_compiler_version_and_the_cpu(tmp_path, monkeypatch):
    compilers = []
    for version in ("13.2.0", "14.1.0"):
        script = tmp_path / f"cxx-{version}"
        script.write_text(f"#!/bin/sh\necho 'g++ (GCC) {version}'\n")
        script.chmod(0o755)
        compilers.append(str(script))
    first, second = (matvec.cache_key(compiler) for compiler in compilers)
    assert first != second
    monkeypatch.setattr(matvec, "_machine", lambda: b"aarch64\nCPU implementer : 0x41\nCPU part : 0xd0c")
    assert matvec.cache_key(compilers[0]) != first
