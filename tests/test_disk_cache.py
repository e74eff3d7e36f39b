"""`lmgen cache`: what lmgen keeps on disk, listed and cleared."""

import pytest

from lmgen import disk_cache
from lmgen.cli import main
from lmgen.loader import mapped


def _fill(root, monkeypatch):
    monkeypatch.setenv("LMGEN_CACHE", str(root))
    weights = mapped.prepared_path("tiny", {"dtype": "float32"})  # where a prepared file goes
    kernels = disk_cache.directory("kernels") / "cpu-0123.so"
    for path, size in ((weights, 3 << 20), (kernels, 1 << 20)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\1" * size)
    return weights, kernels


def test_cache_lists_prepared_weights_and_kernel_builds(tmp_path, monkeypatch, capsys):
    weights, kernels = _fill(tmp_path, monkeypatch)
    assert weights.parent == tmp_path / "weights"
    assert main(["cache"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert weights.name in lines[0] and "3.0 MiB" in lines[0] and "weights" in lines[0]  # largest first
    assert kernels.name in lines[1] and "kernels" in lines[1]
    assert lines[2].endswith("2 file(s), 4.0 MiB")
    assert weights.exists() and kernels.exists()  # listing removes nothing


def test_cache_clear_removes_only_the_kinds_asked(tmp_path, monkeypatch, capsys):
    weights, kernels = _fill(tmp_path, monkeypatch)
    (weights.parent / "tmpabc").mkdir()  # a preparation cut short
    assert main(["cache", "clear", "--kind", "weights"]) == 0
    assert "removed" in capsys.readouterr().out
    assert not weights.parent.exists() and kernels.exists()
    assert main(["cache", "clear"]) == 0
    assert not kernels.exists()
    assert main(["cache"]) == 0
    assert capsys.readouterr().out.strip().endswith("0 file(s), 0.0 MiB")


def test_cache_rejects_an_unknown_action(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["cache", "purge"])
    assert exit.value.code == 2
    assert "invalid choice: 'purge'" in capsys.readouterr().err
