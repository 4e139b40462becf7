"""The repository is self-contained: every design note that code, Gin files or docs
cite is a file under docs/, and the README points at nothing outside the clone."""

import re

from conftest import REPO_ROOT

NOTE = re.compile(r"[\w./-]*\b(?:method|architectures|keras3-notes|layout|models|performance)\.md\b")
SOURCES = ("dhm_keras", "official", "tests", "gin", "benchmarks", "tools", "docs")


def citing_files():
    for folder in SOURCES:
        for path in (REPO_ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".gin", ".sh", ".txt") and path.is_file() and path.name != "test_docs.py":
                yield path
    for name in ("README.md", "BUILD", "pyproject.toml", "requirements.txt"):
        yield REPO_ROOT / name


def test_cited_design_notes_exist_in_docs():
    dangling = []
    for path in citing_files():
        text = path.read_text()
        if "spec/" in text:
            dangling.append(f"{path.relative_to(REPO_ROOT)}: spec/")
        for match in NOTE.finditer(text):
            cited = match.group(0)
            base = path.parent if path.parent.name == "docs" and "/" not in cited else REPO_ROOT
            if not (base / cited).is_file():
                dangling.append(f"{path.relative_to(REPO_ROOT)}: {cited}")
    assert not dangling, f"citations of notes that are not in the repository: {sorted(set(dangling))}"


def test_readme_links_the_paper_and_cites_nothing_outside_the_clone():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "https://arxiv.org/abs/2003.10739" in readme.split("\n## ")[0]
    assert "shared/" not in readme and not re.search(r"(?<!\.)\.\./", readme)
    assert (REPO_ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "2003.10739" in (REPO_ROOT / "CITATION.cff").read_text()
