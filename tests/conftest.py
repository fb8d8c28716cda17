from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TQDM_DISABLE", "1")
# One intra-op thread in tests and the processes they start: many small ops, several processes
# (Prefect server, workers, batch siblings) on 2 cores; spinning OpenMP threads cost 5-30x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("T3D_TORCH_THREADS", "1")
# Remote (fsspec) stores keep a local cache under T3D_CACHE, ~/.cache/t3d by default: tests use
# their own, removed at exit, so a test run leaves nothing in the user's home.
if "T3D_CACHE" not in os.environ:
    os.environ["T3D_CACHE"] = tempfile.mkdtemp(prefix="t3d-test-cache-")
    atexit.register(shutil.rmtree, os.environ["T3D_CACHE"], True)

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
