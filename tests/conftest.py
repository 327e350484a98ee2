"""Session-wide fixtures: a guard that fails any connection outside loopback, and tiny models."""

from __future__ import annotations

import ipaddress
import os
import runpy
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from tiny_models import make_model  # noqa: E402


def _is_loopback(host) -> bool:
    if host in (None, "localhost", ""):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Fail loudly on any socket connection or DNS lookup that leaves the machine."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(host):
            raise RuntimeError(f"test tried to reach the network: {address!r}")
        return real_connect(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            raise RuntimeError(f"test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = guarded_connect
    socket.getaddrinfo = guarded_getaddrinfo
    yield
    socket.socket.connect, socket.getaddrinfo = real_connect, real_getaddrinfo


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model(arch, seed=0, dtype=torch.float32, **config_overrides)``."""
    return make_model


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def run_example(capsys, monkeypatch):
    """Run ``examples/<name>`` as ``__main__`` with ``args``; assert exit code 0; return its stdout."""

    def run(name: str, *args: str) -> str:
        monkeypatch.setattr(sys, "argv", [name, *args])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(EXAMPLES / name), run_name="__main__")
        assert done.value.code == 0
        return capsys.readouterr().out

    return run
