"""Snakemake keeps one handler per hook (the last `onstart:` read replaces the others), so the workflow defines
each hook once: a second one would silently drop the first's work (the plan printed before running, the SIGTERM
report)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_each_hook_is_defined_once():
    files = [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]
    for hook in ("onstart", "onsuccess", "onerror"):
        where = [f.name for f in files for _ in re.finditer(rf"^{hook}:", f.read_text(), re.M)]
        assert len(where) <= 1, f"{hook} defined in {where}"
    snakefile = (ROOT / "Snakefile").read_text()
    onstart = snakefile.split("onstart:", 1)[1].split("\n\n", 1)[0]
    assert "watch()" in onstart and "plan_lines" in onstart
