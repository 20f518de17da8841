"""Shared test setup.

Without a GPU the Triton kernels run through the interpreter; TRITON_INTERPRET must be set
before `triton.jit` wraps them, that is before siri.kernels is first imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:
    from hypothesis import settings as hypothesis_settings
except ImportError:  # the property tests importorskip it
    hypothesis_settings = None

if hypothesis_settings is not None:
    # The property tests draw the same examples on every run, so CI cannot go red by chance;
    # HYPOTHESIS_PROFILE=explore draws fresh ones on each run to hunt for new failures.
    hypothesis_settings.register_profile("ci", derandomize=True, deadline=None)
    hypothesis_settings.register_profile("explore", derandomize=False, deadline=None)
    hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped on a CPU-only machine")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE
