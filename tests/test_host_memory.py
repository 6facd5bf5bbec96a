"""Lean host memory: glibc's allocator maps large blocks on their own and hands freed memory back to the OS."""

from __future__ import annotations

import sys

from dpokit import host_memory


def test_lean_host_memory_works_on_glibc_and_does_nothing_elsewhere(monkeypatch):
    import platform

    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert host_memory.lean_allocator()
    host_memory.release_free_memory()
    monkeypatch.setattr(sys, "platform", "darwin")
    host_memory._glibc.cache_clear()                         # the C library is looked up once per process
    try:
        assert host_memory.lean_allocator() is False
        host_memory.release_free_memory()
    finally:
        monkeypatch.undo()
        host_memory._glibc.cache_clear()
