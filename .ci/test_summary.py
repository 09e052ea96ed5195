"""`make test`'s last words: which EasyEdit line each environment's suite ran under and how many tests ran there.

Reads pytest's JUnit reports (one per environment; tests/conftest.py records the EasyEdit line, transformers and
torch as test-suite properties) and prints one line per environment, then a closing total line.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

LINES = {
    "pypi-0.0.1.dev0": "PyPI easyeditor 0.0.1.dev0",
    "main": "EasyEdit main",
    "none": "no EasyEdit (its tests skipped)",
}


def counts(path: Path) -> tuple[dict[str, int], dict[str, str]]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    props = {p.get("name", ""): p.get("value", "") for s in suites for p in s.iter("property")}
    return total, props


def main(paths: list[str]) -> int:
    grand = {"passed": 0, "failed": 0, "skipped": 0}
    print("\nEasyEdit lines tested:")
    for name in paths:
        path = Path(name)
        env = path.stem
        if not path.is_file():
            print(f"  {env}: no report at {path} (its suite did not run)")
            continue
        c, props = counts(path)
        line = props.get("easyedit_line", "?")
        where = f" from {props['easyeditor_path']}" if props.get("easyeditor_path") else ""
        failed = c["failures"] + c["errors"]
        print(
            f"  {LINES.get(line, line)}{where} (transformers {props.get('transformers', '?')}, torch "
            f"{props.get('torch', '?')}; report {path}): {c['tests']} tests, {c['passed']} passed, {failed} failed, "
            f"{c['skipped']} skipped"
        )
        grand["passed"] += c["passed"]
        grand["failed"] += failed
        grand["skipped"] += c["skipped"]
    print(f"total: {grand['passed']} passed, {grand['failed']} failed, {grand['skipped']} skipped")
    return 1 if grand["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
