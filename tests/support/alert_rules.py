"""Read deploy/prometheus/alerts.yml without a YAML library, and run promtool.

The reader knows only the file's own layout (``- alert: NAME``, ``for:``, a one-line
``summary`` and a folded ``description: >-``); a rule written otherwise makes it fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
INSTALL_HINT = "Debian's prometheus package is not installed: apt-get install -y prometheus"


@dataclass
class Rule:
    """One alert rule's name, severity and annotation templates."""

    name: str
    severity: str = ""
    summary: str = ""
    description: str = ""


def read_rules(path: Path = RULES) -> dict[str, Rule]:
    """Every alert of ``path`` by name."""
    rules: dict[str, Rule] = {}
    rule: Rule | None = None
    folding: list[str] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if folding is not None:
            if line.startswith(" " * 12) and line.strip():
                folding.append(line.strip())
                continue
            assert rule is not None
            rule.description, folding = " ".join(folding), None
        if match := re.match(r"\s+- alert: (\w+)$", line):
            rule = rules[match[1]] = Rule(match[1])
        elif rule is not None and (match := re.match(r"\s+severity: (\w+)$", line)):
            rule.severity = match[1]
        elif rule is not None and (match := re.match(r"\s+summary: (.+)$", line)):
            text = match[1]
            rule.summary = text[1:-1] if text.startswith('"') else text
        elif rule is not None and re.match(r"\s+description: >-$", line):
            folding = []
    if folding is not None and rule is not None:
        rule.description = " ".join(folding)
    return rules


def render(template: str, labels: dict[str, str]) -> str:
    """An annotation as Prometheus renders it, for templates using ``$labels`` only."""
    def label(match: re.Match[str]) -> str:
        return labels.get(match[1], "")

    rendered = re.sub(r"\{\{ \$labels\.(\w+) \}\}", label, template)
    assert "{{" not in rendered, f"template not supported here: {template}"
    return rendered


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool; fails the test when Debian's package is missing."""
    assert Path(PROMTOOL).exists(), INSTALL_HINT
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120,
                          check=False)
