"""`keep_freed_memory` tells glibc, through mallopt, to serve large blocks from its heap and
never trim it; any other C library is refused with one message. The real mallopt is not called
(it would change this test process's allocator)."""
import pytest

from segm.utils import host_memory
from segm.utils.host_memory import for_training  # the real one (tests/conftest.py stubs it for the session)


class FakeLibc:
    def __init__(self, answer=1):
        self.calls, self.answer = [], answer

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.answer


def test_glibc_is_told_to_keep_freed_memory(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda path: libc)
    host_memory.keep_freed_memory()
    # M_MMAP_MAX = 0: no block gets its own mapping; M_TRIM_THRESHOLD: never give the heap back
    assert libc.calls == [(-4, 0), (-1, 2**31 - 1), (-2, 64 << 20)]


def test_glibc_refusal_is_an_error(monkeypatch):
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda path: FakeLibc(answer=0))
    with pytest.raises(host_memory.HostMemoryError, match="refused mallopt"):
        host_memory.keep_freed_memory()


def test_other_c_libraries_are_refused(monkeypatch):
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(host_memory.platform, "system", lambda: "Darwin")
    with pytest.raises(host_memory.HostMemoryError, match="needs glibc .*Darwin.*leave the option out"):
        host_memory.keep_freed_memory()


def test_cpu_training_keeps_freed_memory(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda path: libc)
    assert for_training("cuda") is False and libc.calls == []
    assert for_training("cpu") is True and libc.calls
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert for_training("cpu") is False  # another C library: trains as before


def test_the_trainers_ask_for_it(synthetic_root, tmp_path, monkeypatch):
    from tests.helpers.train import run_cli, tiny_args

    asked = []
    monkeypatch.setattr(host_memory, "for_training", lambda device_type: asked.append(device_type) or False)
    res = run_cli(tiny_args(tmp_path / "run", synthetic_root, "--device", "cpu", "--iterations", "1",
                            "--policy-method", "no_sharing"))
    assert res.exit_code == 0, res.output
    assert asked == ["cpu"]
