import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real datasets beside the project (../shared/data); tests using it skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """Tests see an idle machine: the busy-machine warning depends on whatever else runs on the
    machine running the suite (its own subprocesses included), not on what a test checks;
    test_busy_machine_warning sets its own load."""
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0), raising=False)


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """Four 32^3 phantom subjects in MSD layout (generated once per test session)."""
    from scse_seg.data import generate_phantom

    return generate_phantom(tmp_path_factory.mktemp("phantom"), n_cases=4, shape=(32, 32, 32),
                            seed=0)
