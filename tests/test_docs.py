"""The documentation: the mkdocs site builds with --strict (links, anchors, API reference), and the README's Python
example runs as written."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmc.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, env=env, timeout=600)


def _copy_sources(dest: Path) -> Path:
    """The files the site is built from (not the rest of the repository: data, records, code outside src/)."""
    shutil.copy(ROOT / "mkdocs.yml", dest / "mkdocs.yml")
    shutil.copy(README, dest / "README.md")
    shutil.copytree(ROOT / "docs", dest / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for folder in ("studies", "benchmarks"):
        for p in (ROOT / folder).rglob("*"):
            if p.is_file() and p.suffix in (".md", ".png", ".json"):
                (dest / p.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, dest / p.relative_to(ROOT))
    return dest / "mkdocs.yml"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    done = _mkdocs(ROOT / "mkdocs.yml", out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_site_builds_strict_with_the_readme_as_home_and_the_api_reference(site):
    home = (site / "index.html").read_text()
    assert "Runtime Masking and Cleansing" in home and 'href="api/"' in home   # README, its docs/ links mapped
    api = (site / "api" / "index.html").read_text()
    for name in ("rmc.load_model", "rmc.open_dprime", "rmc.build_rmc", "rmc.evaluate", "rmc.RMC",
                 "rmc.RMCClassifier", "rmc.RMCConfig"):
        assert f'id="{name}"' in api, name                                  # mkdocstrings rendered each name
    assert "computed here, one pass" in api                                 # ... from its docstring
    # Figures outside docs/ travel with the pages that show them.
    assert (site / "studies" / "clean_accuracy" / "clean_accuracy.png").is_file()
    assert 'src="../studies/clean_accuracy/clean_accuracy.png"' in (site / "main-job" / "index.html").read_text()


def test_a_broken_link_or_anchor_fails_the_strict_build(tmp_path):
    config = _copy_sources(tmp_path)
    page = tmp_path / "docs" / "speed.md"
    page.write_text(page.read_text() + "\nSee [nowhere](no-such-page.md).\n")
    broken = _mkdocs(config, tmp_path / "site")
    assert broken.returncode != 0 and "no-such-page.md" in broken.stderr
    page.write_text(page.read_text().replace("(no-such-page.md)", "(cli.md#no-such-heading)"))
    broken = _mkdocs(config, tmp_path / "site")
    assert broken.returncode != 0 and "no-such-heading" in broken.stderr


def _python_example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- python-api -->\n```python\n(.*?)```\n<!-- /python-api -->", text, re.S)
    assert m, "README.md has no Python example between <!-- python-api --> markers"
    return m.group(1)


def test_readme_is_short_and_keeps_its_two_command_blocks():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for marker in ("main-command", "test-command"):     # .ci/run reads the test command from between its markers
        assert re.search(rf"<!-- {marker} -->\n```bash\n.+\n```\n<!-- /{marker} -->", text), marker


def test_readme_python_example_uses_only_rmc_names_in_six_lines():
    code = _python_example()
    assert len(code.strip().splitlines()) <= 6
    tree = ast.parse(code)
    imports = [a.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names]
    assert imports == ["rmc"]
    assigned = {n.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
                for n in ast.walk(t) if isinstance(n, ast.Name)}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert used - assigned <= {"rmc", "images", "labels", "print"}


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The example as written, on a model and D' made by the commands the README names (digits, small)."""
    monkeypatch.chdir(tmp_path)
    assert cli(["train", "--dataset", "digits", "--epochs", "3", "--out", "m.safetensors", "--quiet"]) == 0
    assert cli(["augment", "--model", "m.safetensors", "--out", "dprime", "--steps", "3", "--train-subset", "300",
                "--quiet"]) == 0
    from rmc.data import load_dataset
    test = load_dataset("digits", "test")
    images, labels = test.float_images()[:12], test.labels[:12]
    capsys.readouterr()
    exec(compile(_python_example(), "README.md", "exec"), {"images": images, "labels": labels})
    static, defended = (float(v) for v in capsys.readouterr().out.split())
    import rmc
    model, _ = rmc.load_model("m.safetensors")
    with torch.no_grad():
        assert static == (model(images).argmax(1) == labels).float().mean().item()
    assert 0.5 <= defended <= 1                       # RMC classifies the digits (12 inputs, k = 256 of 600)


def test_design_page_names_every_module_and_only_modules_that_exist():
    """docs/design.md is the newcomer's map of the code: a module added, renamed or removed must show there."""
    layout = (ROOT / "docs" / "design.md").read_text()
    src = ROOT / "src" / "rmc"
    modules = {p.name for p in src.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") and p.parent.name != "commands"}
    named = set(re.findall(r"\b([a-z_0-9]+\.py)\b", layout)) - {"__init__.py"}
    assert not modules - named, f"modules missing from docs/design.md: {sorted(modules - named)}"
    unknown = named - modules - {p.name for d in ("docs", "tests") for p in (ROOT / d).glob("*.py")}
    assert not unknown, f"docs/design.md names files that do not exist: {sorted(unknown)}"
