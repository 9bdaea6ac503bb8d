"""The README and docs/results/ point at files and scripts that exist: a moved or renamed file must not leave
a link or a command in the docs that leads nowhere."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs" / "results").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")                          # [text](target) and ![alt](target)
SCRIPT = re.compile(r"\bpython (?:-m \S+ )?((?:[\w./-]+/)?\w+\.py)\b")   # python train_dqn.py, python benchmarks/x.py


def relative_links(doc: Path) -> list[str]:
    return [t for t in LINK.findall(doc.read_text()) if not re.match(r"[a-z]+://|#|mailto:", t)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves(doc):
    missing = [t for t in relative_links(doc) if not (doc.parent / t.split("#")[0]).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_the_readme_links_each_stage_history():
    linked = {(ROOT / t).resolve() for t in relative_links(ROOT / "README.md")}
    histories = set(p.resolve() for p in DOCS[1:])
    assert histories and histories <= linked, f"not linked from the README: {sorted(histories - linked)}"


def test_the_readme_names_only_scripts_that_exist():
    """Every `python <script>.py` in the README (the commands beside its numbers) is a file of the project."""
    named = set(SCRIPT.findall((ROOT / "README.md").read_text()))
    assert "train_latent_action.py" in named and "benchmarks/play_speed.py" in named   # the pattern finds them
    assert not [s for s in named if not (ROOT / s).exists()], sorted(s for s in named if not (ROOT / s).exists())


SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
                 if '__name__ == "__main__"' in p.read_text())   # the modules (atari_env.py, metrics.py, ...) are not run


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script):
    """Every stage script and benchmark prints its usage for --help and exits 0, without running anything."""
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "WANDB_MODE": "disabled", "SDL_VIDEODRIVER": "dummy"})
    assert proc.returncode == 0 and "usage:" in proc.stdout, f"{script}: {proc.returncode}\n{proc.stderr[-1500:]}"
