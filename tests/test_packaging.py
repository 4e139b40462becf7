"""The package installs: pyproject.toml agrees with requirements.txt, and a wheel
built from the checkout installs into a fresh virtual environment whose
`dhm-train --help` lists the project's flags and which finds the quick start
from any directory.

The fresh environment gets the pinned requirements "already present" by a
`.pth` file naming this interpreter's site-packages (no network, no second
TensorFlow download); the package itself comes only from the wheel.
"""

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest

from conftest import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
PROJECT_FLAGS = ("--gin_file", "--gin_param", "--gin_bindings", "--model_dir", "--mode", "--data_dir",
                 "--checkpoint", "--debug", "--verbosity")


def pinned_requirements() -> dict:
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_pyproject_ranges_admit_the_pinned_versions():
    from packaging.requirements import Requirement

    pins = pinned_requirements()
    extras = PYPROJECT["project"]["optional-dependencies"]
    declared = PYPROJECT["project"]["dependencies"] + extras["test"] + extras["plots"]
    for spec in declared:
        requirement = Requirement(spec)
        if requirement.name in pins:
            assert requirement.specifier.contains(pins[requirement.name]), (spec, pins[requirement.name])
    runtime = {Requirement(s).name for s in PYPROJECT["project"]["dependencies"]}
    # Pins of the [test] extra (and setuptools, to build the wheel) are not runtime ones.
    test_only = {Requirement(s).name.lower() for s in extras["test"]} | {"setuptools"}
    assert set(pins) - test_only <= runtime, "a pinned runtime requirement is missing from pyproject.toml"
    assert "keras-cv" not in runtime | set(pins), "keras-cv is imported nowhere: an extra only"


def test_keras_cv_is_imported_nowhere():
    sources = [p for d in ("dhm_keras", "official", "tests", "benchmarks", "tools") for p in (REPO_ROOT / d).rglob("*.py")]
    importing = [str(p) for p in sources if re.search(r"^\s*(import|from)\s+keras_cv\b", p.read_text(), re.M)]
    assert not importing, f"keras-cv is only an extra; imported by {importing}"


def test_every_gin_and_quickstart_file_is_installed():
    """setuptools' data-files keep no sub-folders of a glob: a new folder needs its own entry."""
    data_files = PYPROJECT["tool"]["setuptools"]["data-files"]
    missing = []
    for top in ("gin", "quickstart_data"):
        for path in (REPO_ROOT / top).rglob("*"):
            if path.is_file():
                relative = path.relative_to(REPO_ROOT).as_posix()
                target = "share/dhm_keras/" + os.path.dirname(relative)
                if not any(fnmatch.fnmatch(relative, g) for g in data_files.get(target, ())):
                    missing.append(relative)
    assert not missing, f"not in pyproject.toml's [tool.setuptools.data-files]: {missing}"


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory):
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools (requirements.txt)")
    work = tmp_path_factory.mktemp("packaging")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = work / "src"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "device_data", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                            "-w", str(work / "wheel"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (work / "wheel").glob("dhm_keras-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "pinned_requirements.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")  # tensorflow, keras, gin, ... of this interpreter
    installed = subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    elsewhere = work / "elsewhere"  # not the repository, not the venv
    elsewhere.mkdir()
    return venv, elsewhere


def clean_env():
    """No PYTHONPATH: whatever imports must come from the installed wheel."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_installed_command_help_lists_the_project_flags(installed_venv):
    venv, elsewhere = installed_venv
    result = subprocess.run([str(venv / "bin" / "dhm-train"), "--help"], cwd=elsewhere, capture_output=True,
                            text=True, timeout=300, env=clean_env())
    for flag in PROJECT_FLAGS:
        assert flag in result.stdout, f"{flag} missing from dhm-train --help:\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
    assert "Gin config file(s)" in result.stdout and "Train, evaluate, export or import" in result.stdout


def test_installed_package_finds_the_quickstart_from_anywhere(installed_venv):
    venv, elsewhere = installed_venv
    script = (
        "import dhm_keras, official\n"
        "from dhm_keras import gin_utils\n"
        "print(dhm_keras.__file__); print(official.__file__)\n"
        "print(gin_utils.resolve_path('gin/quickstart.gin')); print(gin_utils.resolve_path('quickstart_data'))\n"
    )
    result = subprocess.run([str(venv / "bin" / "python"), "-c", script], cwd=elsewhere, capture_output=True,
                            text=True, timeout=300, env=clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    package, infra, gin_file, data = result.stdout.split()
    for path in (package, infra):
        assert path.startswith(str(venv)), f"imported {path}, not the installed wheel"
    share = os.path.join(str(venv), "share", "dhm_keras")
    assert gin_file == os.path.join(share, "gin", "quickstart.gin") and os.path.isfile(gin_file)
    assert data == os.path.join(share, "quickstart_data")
    assert os.path.isfile(os.path.join(data, "cifar10_jpeg", "1.0.0", "dataset_info.json"))
