"""The README's reliability section names how many cases test its guarantees: that number is what pytest collects
from the files it names, so it cannot drift from the tests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_counts_the_reliability_cases_pytest_collects() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^\* (\d+) cases in `tests/test_reliability\*\.py` and `tests/test_lifelong_resume\.py`",
                      readme, flags=re.MULTILINE)
    assert match, "README.md's Reliability section no longer says how many cases test it"
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_reliability*.py"))
    files.append("tests/test_lifelong_resume.py")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    collected = re.search(r"^(\d+) tests? collected", done.stdout, flags=re.MULTILINE)
    assert collected, done.stdout[-2000:] + done.stderr[-2000:]
    assert int(match.group(1)) == int(collected.group(1))
