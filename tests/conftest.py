"""Shared test fixtures: paths to the golden files of the official implementation."""

import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def fixture_path(name: str) -> pathlib.Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"golden fixture {path} is not present")
    return path


@pytest.fixture(scope="session")
def scan_ref():
    return dict(np.load(fixture_path("selective_scan_ref.npz")))


@pytest.fixture(scope="session")
def vim_io():
    return dict(np.load(fixture_path("vim_tiny_d4_io.npz")))


@pytest.fixture(scope="session")
def vim_weights_path():
    return fixture_path("vim_tiny_d4_weights.npz")
