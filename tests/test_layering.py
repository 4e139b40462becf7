"""Import layering: every module imports only from its own layer and the layers below.

Layers, bottom up: `official/` (method-agnostic, imports no `dhm_keras`);
the pure-Python base (errors, heads, mimicking graph, model directory);
models, losses, data and evaluation (each on the base only, data also on
itself); the trainer (model, callbacks, config, experiment, tasks,
train_lib, main), which never imports the analysis tools; and the analysis
tools on top. Read from the source with `ast`, so lazy imports inside
functions count too.
"""

import ast
import re

import pytest

from conftest import REPO_ROOT

BASE = {"dhm_keras", "dhm_keras.errors", "dhm_keras.heads", "dhm_keras.mimicking_graph", "dhm_keras.model_dir"}


def imported_modules(path):
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # A relative import is resolved against the module's package.
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:  # a submodule, or a name defined in module
                full = f"{module}.{alias.name}"
                names.add(full if is_module(full) else module)
    return {n for n in names if n.split(".")[0] in ("dhm_keras", "official")}


def is_module(name):
    path = REPO_ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def module_name(path):
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")


def allowed(name):
    """Predicate over imported names for the module `name`."""
    own_package = lambda prefix: (lambda m: m == prefix or m.startswith(prefix + "."))  # noqa: E731
    official = own_package("official")
    base = lambda m: m in BASE or official(m)  # noqa: E731
    if name.startswith("official"):
        return official
    if name in BASE:
        return lambda m: m in BASE or official(m)
    for package in ("dhm_keras.models", "dhm_keras.data", "dhm_keras.evaluation"):
        if name.startswith(package):
            return lambda m, p=package: base(m) or own_package(p)(m) or (
                p == "dhm_keras.evaluation" and own_package("dhm_keras.data")(m)
            )
    if name == "dhm_keras.losses":
        return base
    if name.startswith("dhm_keras.analysis"):
        return lambda m: True
    return lambda m: not own_package("dhm_keras.analysis")(m)  # the trainer


MODULES = sorted(
    p for package in ("official", "dhm_keras") for p in (REPO_ROOT / package).rglob("*.py")
)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_follow_the_layers(path):
    name = module_name(path)
    ok = allowed(name)
    bad = sorted(m for m in imported_modules(path) if not ok(m))
    assert not bad, f"{name} imports above its layer: {bad}"


def test_trainer_names_no_dataset_and_has_shrunk():
    source = (REPO_ROOT / "dhm_keras" / "train_lib.py").read_text()
    named = re.findall(r"cifar|imagenet|market|duke|reid|is_reid", source, flags=re.IGNORECASE)
    assert not named, f"train_lib names datasets or tasks: {sorted(set(named))}"
    assert len(source.splitlines()) < 582, "train_lib.py must stay smaller than before the task split"


def test_relative_imports_are_resolved(tmp_path, monkeypatch):
    """`from ..analysis import x` inside dhm_keras/data/ counts as dhm_keras.analysis.x."""
    module = REPO_ROOT / "dhm_keras" / "data" / "pipeline.py"
    source = "from ..analysis import curves\nfrom . import stats\n"
    monkeypatch.setattr(type(module), "read_text", lambda self: source)
    assert imported_modules(module) == {"dhm_keras.analysis.curves", "dhm_keras.data.stats"}
