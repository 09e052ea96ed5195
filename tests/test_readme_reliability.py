"""The README's reliability section names the test files that check its guarantees: they must exist and hold
cases, so the pointer cannot go stale (the README gives no count: CI prints it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_names_the_reliability_test_files_and_they_hold_cases() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^\* `tests/test_reliability\*\.py` and `tests/test_lifelong_resume\.py` check these",
                      readme, flags=re.MULTILINE)
    assert match, "README.md's Reliability section no longer names the files that test it"
    assert not re.search(r"\b\d+ cases\b", readme), "README.md must not count test cases (CI prints the counts)"
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_reliability*.py"))
    assert files, "no tests/test_reliability*.py"
    files.append("tests/test_lifelong_resume.py")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    collected = re.search(r"^(\d+) tests? collected", done.stdout, flags=re.MULTILINE)
    assert collected and int(collected.group(1)) > 0, done.stdout[-2000:] + done.stderr[-2000:]
