"""README.md and docs/ are for users: short, no work history, and every link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", REPO / "testbed" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LIMITS = {"README.md": 300, "testbed/README.md": 200, "docs/history.md": 150}

# Words of a lab notebook, not of a user's page: work sessions, issue numbers, dated check logs, test counts.
HISTORY = [
    (re.compile(r"\bsessions?\b", re.IGNORECASE), "a work session"),
    (re.compile(r"\bissue\s*#?\s*\d+", re.IGNORECASE), "an issue number"),
    (re.compile(r"\bissue #", re.IGNORECASE), "an issue number"),
    (re.compile(r"\b20\d\d-\d\d-\d\d\b"), "a date"),
    (re.compile(r"\b\d+ passed\b|\b\d+ (?:tests|failed|skipped)\b"), "a test count"),
    (re.compile(r"\bcommit [0-9a-f]{7,40}\b"), "a commit of the work history"),
]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _name(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_no_work_history_in_users_pages(page: Path) -> None:
    found = [(n + 1, what, m.group(0)) for n, line in enumerate(page.read_text().splitlines())
             for pattern, what in HISTORY for m in pattern.finditer(line)]
    assert found == [], f"{_name(page)}: {found}"


@pytest.mark.parametrize(("name", "limit"), LIMITS.items())
def test_pages_stay_short(name: str, limit: int) -> None:
    lines = len((REPO / name).read_text().splitlines())
    assert lines <= limit, f"{name}: {lines} lines (at most {limit})"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_and_figure_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert broken == [], f"{_name(page)}: {broken}"


def test_the_readme_names_the_five_steps_and_the_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    steps = re.findall(r"^\d\. \*\*", text, flags=re.MULTILINE)
    assert len(steps) == 5
    assert "`make demo`" in text and "`make test`" in text and "docs/own-model.md" in text
    assert "## Reliability" in text
