import pytest

from checkpoints import VARIANTS, build_checkpoint


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Builds (once per session) the tiny random checkpoint of a variant and returns its folder."""
    cache = {}

    def make(variant: str):
        if variant not in cache:
            cache[variant] = build_checkpoint(tmp_path_factory.mktemp(variant), variant)
        return cache[variant]

    return make


@pytest.fixture(scope="session")
def llama_path(checkpoint_factory):
    return checkpoint_factory("llama")


ALL_VARIANTS = list(VARIANTS)
