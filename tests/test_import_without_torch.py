"""What `--mode=import` promises where PyTorch is absent (runs without PyTorch)."""

from __future__ import annotations

import ast
import sys

import pytest

from conftest import REPO_ROOT


def test_pytorch_missing_says_which_extra(tmp_path, monkeypatch):
    """Without PyTorch the import stops before anything is built or written,
    naming the extra to install."""
    from dhm_keras import errors, pytorch_import

    checkpoint = tmp_path / "r32.pth"
    checkpoint.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(errors.CheckpointImportError, match=r"download.pytorch.org/whl/cpu .*'.\[torch\]'"):
        pytorch_import.read_checkpoint(str(checkpoint))


def test_torch_is_imported_only_by_the_importer():
    """Training and serving never need PyTorch: only `pytorch_import` names it."""
    offenders = []
    for package in ("dhm_keras", "official"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                if any(name.split(".")[0] == "torch" for name in names):
                    offenders.append(str(path.relative_to(REPO_ROOT)))
    assert offenders == ["dhm_keras/pytorch_import.py"]
