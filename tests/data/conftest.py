import pytest

from moe_llava.data import generate_dataset

N_TRAIN, N_HELDOUT = 240, 60


@pytest.fixture(scope="session")
def synthetic_ds(tmp_path_factory):
    """One small dataset shared by the data tests (~1 s to generate)."""
    return generate_dataset(tmp_path_factory.mktemp("synthetic"), N_TRAIN, N_HELDOUT, seed=0)
