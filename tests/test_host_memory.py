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


class _FakeLibc:
    def __init__(self) -> None:
        self.mallopt_calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.mallopt_calls.append((param, value))
        return 1


def test_a_threshold_set_in_the_environment_is_kept(monkeypatch):
    """`MALLOC_MMAP_THRESHOLD_=1048576` (each block of 1 MiB or more mapped alone: no heap holes, slower steps)
    is the user's choice; the 32 MiB default must not override it."""
    libc = _FakeLibc()
    monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert host_memory.lean_allocator() and libc.mallopt_calls == [(host_memory.M_MMAP_THRESHOLD, 32 << 20)]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert host_memory.lean_allocator() and len(libc.mallopt_calls) == 1
