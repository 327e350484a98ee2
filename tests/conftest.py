"""Session-wide fixtures: a guard that fails any connection outside loopback, and tiny models."""

from __future__ import annotations

import atexit
import ipaddress
import os
import runpy
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="th_edit_test_hf_home_")  # no real token or cache leaks in
atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)
os.environ.pop("HF_TOKEN", None)

from tiny_models import make_model  # noqa: E402

LIVE_HUB_HOSTS = ("huggingface.co", "hf.co")  # reachable only for the opt-in live test (test_hub_live.py)


def _is_loopback(host) -> bool:
    if host in (None, "localhost", ""):
        return True
    if os.environ.get("TH_EDIT_LIVE_HUB_TOKEN") and str(host).endswith(LIVE_HUB_HOSTS):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Fail loudly on any socket connection or DNS lookup that leaves the machine."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
    live_addresses: set[str] = set()

    def guarded_connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(host) and host not in live_addresses:
            raise RuntimeError(f"test tried to reach the network: {address!r}")
        return real_connect(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            raise RuntimeError(f"test tried to resolve {host!r}")
        infos = real_getaddrinfo(host, *args, **kwargs)
        if host not in (None, "localhost", "") and str(host).endswith(LIVE_HUB_HOSTS):
            live_addresses.update(info[4][0] for info in infos)  # only the opt-in live test gets here
        return infos

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


HUB_TOKEN, OTHER_TOKEN = "hf_test_alice_write", "hf_test_bob_write"


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    """The Hub-compatible test server (``tests/hub_server.py``) on 127.0.0.1, for the whole session."""
    from hub_server import serve

    server, state = serve(tmp_path_factory.mktemp("hub"), {HUB_TOKEN: "alice", OTHER_TOKEN: "bob"})
    yield state
    server.shutdown()


@pytest.fixture
def hub(hub_server, monkeypatch):
    """Point the real, unpatched huggingface_hub client (and transformers) at the test server."""
    from hub_server import point_hub_at

    point_hub_at(monkeypatch, hub_server.endpoint)
    hub_server.faults.clear()
    hub_server.token = HUB_TOKEN
    hub_server.other_token = OTHER_TOKEN
    return hub_server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny llama with a word-level tokenizer covering the task templates, saved as a plain HF directory."""
    from tiny_models import laundry_model

    from th_edit import ChannelEditor

    model, tok = laundry_model("llama", seed=3)
    folder = tmp_path_factory.mktemp("tiny_model") / "model"
    ChannelEditor(model).save_pretrained(folder, tokenizer=tok)
    return folder
