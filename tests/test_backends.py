import subprocess
import sys
import warnings

import pytest

from neuroidx_fast import backends


@pytest.fixture
def broken_cpp(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "cpp", "neuroidx_fast.ops.does_not_exist")
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_reported", set())


def test_a_backend_that_cannot_load_is_reported_once_and_skipped(broken_cpp):
    with pytest.warns(RuntimeWarning, match="backend 'cpp' is unavailable on cpu.*To enable it"):
        assert backends.resolve_name("auto", "cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve_name("auto", "cpu") == "torch"  # no second report
    assert "failed to load" in backends.unavailable_reason("cpp", "cpu")
    with pytest.raises(backends.BackendUnavailable, match="cpp"):
        backends.resolve_name("cpp", "cpu")


def test_reference_and_cpp_available_on_cpu():
    assert {"torch", "cpp"} <= set(backends.available("cpu"))
    assert "cuda" not in backends.available("cpu")


def test_info_command_lists_backends():
    out = subprocess.run([sys.executable, "-m", "neuroidx_fast", "info"], capture_output=True, text=True, check=True)
    assert "neuroidx_fast" in out.stdout and "torch" in out.stdout
    for name in backends.BACKENDS:
        assert f"  {name}" in out.stdout
    assert "auto picks" in out.stdout
