import pytest

from checkpoints import VARIANTS, build_checkpoint, truncated_copy
from lmgen import kernels

# Loaded once for the session (engines load them too): which kernels a layer uses must not
# depend on whether an earlier test happened to load a model.
kernels.load()


@pytest.fixture(scope="session")
def cpu_kernels():
    """For the tests of lmgen's CPU kernels: they skip where the kernels cannot run by design (no
    AVX2, no compiler, LMGEN_CPU_KERNELS=0), saying why, and fail where the kernels should have
    built and did not: a compile error in cpu.cpp must not pass as a skip."""
    if kernels.build_failed:
        pytest.fail(f"lmgen's CPU kernels did not build on a machine that can run them: {kernels.why_not}",
                    pytrace=False)
    if not kernels.loaded:
        pytest.skip(f"lmgen's CPU kernels cannot run here: {kernels.why_not}")


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


@pytest.fixture(scope="session")
def llama_draft_path(llama_path, tmp_path_factory):
    """The tiny Llama's first layer alone: a draft model for it (speculative decoding) that agrees often."""
    return truncated_copy(llama_path, tmp_path_factory.mktemp("drafts") / "llama-1-layer", num_layers=1)


ALL_VARIANTS = list(VARIANTS)
