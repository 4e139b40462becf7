"""BUILD stays in step with the code: every module of official/ and dhm_keras/ in exactly one target."""

import glob as globlib
from collections import Counter

from conftest import REPO_ROOT


def build_sources():
    """Evaluates BUILD with stand-ins for the Bazel rules and returns library/binary srcs."""
    sources = []

    def glob(patterns, exclude=()):
        found = set()
        for pattern in patterns:
            found |= set(globlib.glob(pattern, root_dir=REPO_ROOT, recursive=True))
        return sorted(found - set(exclude))

    def rule(**kwargs):
        sources.extend(kwargs.get("srcs", []))

    def py_test(**kwargs):
        pass

    namespace = {
        "load": lambda *args: None,
        "requirement": lambda name: name,
        "package": lambda **kwargs: None,
        "glob": glob,
        "py_library": rule,
        "py_binary": rule,
        "py_test": py_test,
    }
    exec(compile((REPO_ROOT / "BUILD").read_text(), "BUILD", "exec"), namespace)
    return sources


def test_every_module_in_exactly_one_target():
    counts = Counter(build_sources())
    modules = sorted(
        str(p.relative_to(REPO_ROOT))
        for package in ("official", "dhm_keras")
        for p in (REPO_ROOT / package).rglob("*.py")
    )
    missing = [m for m in modules if counts[m] == 0]
    repeated = [m for m, n in counts.items() if n > 1]
    stale = [m for m in counts if not (REPO_ROOT / m).exists()]
    assert not missing, f"modules in no BUILD target: {missing}"
    assert not repeated, f"modules in several BUILD targets: {repeated}"
    assert not stale, f"BUILD names files that do not exist: {stale}"
