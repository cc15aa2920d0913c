"""``knhk registry check`` leaves the cache entry that load_compiled reads warm."""

from __future__ import annotations

import logging
import os

from knhk.validation.cli import registry_check_main
from knhk.validation.compiled import CompiledRegistry, load_compiled, save_compiled
from knhk.validation.loader import RegistryFiles, resolve_files


def _entries(d) -> list[str]:
    return sorted(f for f in os.listdir(d) if f.endswith(".json")) if os.path.isdir(d) else []


def test_the_check_writes_the_entry_a_load_then_reads(small_registry, tmp_path, capsys):
    cache = tmp_path / "c"
    assert registry_check_main([small_registry, "--cache-dir", str(cache)]) == 0
    capsys.readouterr()
    (entry,) = _entries(cache)
    before = (cache / entry).stat().st_mtime_ns
    warm = load_compiled(small_registry, cache_dir=cache)
    assert warm._registry is None                     # from the cache, not the YAML
    assert (cache / entry).stat().st_mtime_ns == before  # and not rewritten
    cold = load_compiled(small_registry, cache=False)
    assert warm.to_json() == cold.to_json()


def test_no_cache_writes_nothing(small_registry, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry_check_main([small_registry, "--no-cache"]) == 0
    capsys.readouterr()
    assert _entries(tmp_path / "xdg" / "knhk") == []
    assert registry_check_main([small_registry]) == 0          # the default directory
    capsys.readouterr()
    assert len(_entries(tmp_path / "xdg" / "knhk")) == 1


def test_save_compiled_returns_the_file_and_none_when_it_cannot_write(small_registry, tmp_path,
                                                                     caplog):
    files = RegistryFiles(small_registry)
    compiled = CompiledRegistry.from_registry(resolve_files(files), files)
    written = save_compiled(compiled, tmp_path / "d")
    assert written is not None and os.path.dirname(written) == str(tmp_path / "d")
    assert load_compiled(small_registry, cache_dir=tmp_path / "d")._registry is None
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="knhk.validation.compiled"):
        assert save_compiled(compiled, blocker / "sub") is None
    assert "cannot write the registry cache" in caplog.text
