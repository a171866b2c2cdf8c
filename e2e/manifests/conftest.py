"""Shared fixtures: where the repo and the parley-operator binary are."""
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
KUBERNETES_VERSION = os.environ.get("PARLEY_KUBERNETES_VERSION", "1.34.0")


@pytest.fixture(scope="session")
def operator_bin() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("PARLEY_OPERATOR_BIN", REPO / "target/debug/parley-operator"))
    if not path.exists():
        subprocess.run(["cargo", "build", "-q", "-p", "parley-operator"], cwd=REPO, check=True)
    return path


@pytest.fixture(scope="session")
def crds_yaml(operator_bin) -> str:
    return subprocess.run([operator_bin, "crds"], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="session")
def rendered_samples(operator_bin) -> str:
    result = subprocess.run(
        [operator_bin, "render", "-f", REPO / "config/samples"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
