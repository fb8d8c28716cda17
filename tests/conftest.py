from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TQDM_DISABLE", "1")
# One intra-op thread in tests and the processes they start: many small ops, several processes
# (Prefect server, workers, batch siblings) on 2 cores; spinning OpenMP threads cost 5-30x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("T3D_TORCH_THREADS", "1")

import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (own database) for every test that runs a real flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def identity_prior():
    """A prior source for flows whose stages never load a model: only its identity is hashed."""
    return "tiny-pixel"
