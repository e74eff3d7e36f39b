import pytest

from checkpoints import VARIANTS, build_checkpoint
from lmgen import kernels

# Loaded once for the session (engines load them too): which kernels a layer uses must not
# depend on whether an earlier test happened to load a model.
kernels.load()


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
