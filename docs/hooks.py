"""mkdocs hook: the site holds the repository's README pages beside docs/, with the links between them intact.

Every Markdown file links as it does on a code host, relative to where it sits in the repository (docs/speed.md
links `../studies/README.md`, README.md links `docs/speed.md`). The site is rooted at docs/, so this hook adds
the Markdown and figures of the folders in EXTRA (and README.md, the home page) at their repository paths, with any
other repository file a page links to (a JSON of results, a script), and rewrites each relative link from a
repository path to the site path it became (docs/X -> X, the rest unchanged).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parent.parent
DOCS = "docs"
EXTRA = ("README.md", "studies", "benchmarks")      # repository paths outside docs/ that the site includes
KINDS = {".md", ".png", ".svg", ".jpg"}             # what of them: pages and figures (not data or code)
LINK = re.compile(r"(\]\()([^)\s]+)(\))")            # a Markdown link or image target


def _extra_files() -> list[str]:
    found = []
    for name in EXTRA:
        path = REPO / name
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        found += [p.relative_to(REPO).as_posix() for p in candidates if p.suffix in KINDS]
    return found


def _targets(page: str) -> set[str]:
    """Repository files that the Markdown file at repository path `page` links to."""
    found = set()
    for m in LINK.finditer((REPO / page).read_text()):
        target = m.group(2).partition("#")[0]
        if target and not re.match(r"^[a-z]+:|^/", target):
            path = posixpath.normpath(posixpath.join(posixpath.dirname(page), target))
            if not path.startswith("..") and (REPO / path).is_file():
                found.add(path)
    return found


def on_files(files: Files, config) -> Files:
    def add(rel: str) -> None:
        files.append(File(rel, str(REPO), config["site_dir"], config["use_directory_urls"]))
    extra = _extra_files()
    for rel in extra:
        add(rel)
    pages = extra + [_repo_path(f.src_uri, f.abs_src_path) for f in files.documentation_pages()]
    have = {_repo_path(f.src_uri, f.abs_src_path) for f in files}
    for rel in sorted({t for page in pages if page.endswith(".md") for t in _targets(page)} - have):
        add(rel)
    return files


def _repo_path(src_uri: str, abs_src_path: str | None) -> str:
    """Where a site file sits in the repository (theme files, outside it, keep their site path under docs/)."""
    path = Path(abs_src_path).resolve() if abs_src_path else None
    return path.relative_to(REPO).as_posix() if path and path.is_relative_to(REPO) else f"{DOCS}/{src_uri}"


def _site_path(repo_path: str) -> str:
    return repo_path[len(DOCS) + 1:] if repo_path.startswith(DOCS + "/") else repo_path


def on_page_markdown(markdown: str, page, config, files) -> str:
    here = _repo_path(page.file.src_uri, page.file.abs_src_path)
    site_here = posixpath.dirname(_site_path(here))

    def rewrite(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^[a-z]+:|^/|^#", target):
            return m.group(0)                        # absolute URL, site-absolute path or anchor in the page
        path, _, anchor = target.partition("#")
        repo_target = posixpath.normpath(posixpath.join(posixpath.dirname(here), path))
        new = posixpath.relpath(_site_path(repo_target), site_here or ".")
        return f"{m.group(1)}{new}{'#' + anchor if anchor else ''}{m.group(3)}"
    return LINK.sub(rewrite, markdown)
