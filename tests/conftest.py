"""Every test runs with an empty HOME and its own cache: nothing touches the real home
directory, a real Modal token, or the repository's validated-matrix cache."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project's modules are flat files at the root


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MODAL_VLLM_CACHE_DIR", str(home / "cache"))
    for name in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_PROFILE", "VLLM_API_KEY",
                 "API_KEY", "MODAL_VLLM_CONFIG", "MODAL_CONFIG_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(home / ".modal.toml"))
    monkeypatch.setenv("MODAL_VLLM_ENV_FILE", str(home / ".env"))  # not a .env in the checkout
    return home


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """The shipped matrix, loaded once per test module (its validated copy cached in a
    temporary directory: module scope outlives the per-test environment above)."""
    import config  # importable once ROOT is on sys.path (above)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODAL_VLLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return config.load()
