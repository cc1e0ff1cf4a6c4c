import pytest

from tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """One tiny official-layout checkpoint per backbone family."""
    root = tmp_path_factory.mktemp("ckpt")
    for family in ("stablelm", "phi"):
        write_tiny_checkpoint(root / family, family)
    return {family: root / family for family in ("stablelm", "phi")}
