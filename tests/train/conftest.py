import pytest

from moe_llava.data import generate_dataset
from tests.tiny import tiny_tokenizer, write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic LLaVA-JSON dataset (real image files, captions, instructions, POPE, open questions)."""
    return generate_dataset(tmp_path_factory.mktemp("data"), n_train=24, n_heldout=4, seed=0)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory):
    """A dense (moe_enable: false) tiny checkpoint: what stages I and II start from."""
    directory = tmp_path_factory.mktemp("dense")
    write_tiny_checkpoint(directory, moe=False)
    return directory
