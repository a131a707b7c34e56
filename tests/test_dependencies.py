"""Every third-party import in src/ is declared in pyproject.toml (core or an extra): deptry,
configured in pyproject.toml, fails on an undeclared (transitive) one and on a declared one that
is not used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_every_import_in_src_is_declared():
    out = subprocess.run([sys.executable, "-m", "deptry", "--no-ansi", "src"], cwd=ROOT, check=False,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No dependency issues found" in out.stdout + out.stderr


def test_deptry_fails_on_an_undeclared_import(tmp_path):
    """The check can fail: a module importing a package only something else pulls in."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("import yaml\nimport regex\n")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "pkg"\nversion = "0"\ndependencies = ["pyyaml"]\n'
    )
    out = subprocess.run([sys.executable, "-m", "deptry", "--no-ansi", "pkg"], cwd=tmp_path, check=False,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1
    assert "DEP003 'regex' imported but it is a transitive dependency" in out.stdout + out.stderr


def test_augmentation_without_jieba_names_the_extra(monkeypatch):
    from lorasft.data import augment
    from lorasft.data.formats import DataError

    monkeypatch.setitem(sys.modules, "jieba", None)  # import jieba raises ImportError
    augment._jieba.cache_clear()
    try:
        with pytest.raises(DataError, match=r"pip install 'lorasft\[augment\]'"):
            augment.segment("一个句子")
    finally:
        augment._jieba.cache_clear()
