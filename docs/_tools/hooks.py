"""MkDocs hooks for the docs site (``hooks:`` in ``mkdocs.yml``).

- Every page gets an autorefs identifier ``doc:<path without .md>`` (``doc:concepts``), which is
  what the griffe extension turns a docstring's ``:doc:`concepts``` into. An unknown page is an
  unresolved cross-reference, so ``mkdocs build --strict`` fails on it.
- The home page is the README: a page whose Markdown holds the line ``--8<-- "README.md"`` gets
  the README there, with its repository-relative links (``docs/concepts.md``,
  ``CHANGELOG.md``) rewritten for the site. (pymdownx.snippets includes the other files, which
  need no rewriting; it runs after this hook, so it never sees this line.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

DOC_PREFIX = "doc:"
README_DIRECTIVE = '--8<-- "README.md"'

# Files at the repository root that the site has a page for.
ROOT_PAGES = {"CHANGELOG.md": "changelog.md", "CONTRIBUTING.md": "contributing.md"}

_TITLE_RE = re.compile(r"^(# [^{\n]+?)[ \t]*$", re.MULTILINE)
_LINK_RE = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s]+)\)")


def rebase_readme_links(markdown: str) -> str:
    """Rewrite the README's repository-relative links for a page at the root of ``docs/``.

    ``docs/x.md`` becomes ``x.md``, a root file with a page of its own links there, and a link to
    anything else in the repository (``examples/fastapi_app.py``) keeps only its text, since the
    site does not publish it. The title gets the anchor ``home``.
    """

    def replace(match: re.Match[str]) -> str:
        text, target = match["text"], match["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#", target):
            return match[0]
        path, hash_, anchor = target.partition("#")
        if path.startswith("docs/"):
            return f"[{text}]({path.removeprefix('docs/')}{hash_}{anchor})"
        if path in ROOT_PAGES:
            return f"[{text}]({ROOT_PAGES[path]}{hash_}{anchor})"
        return text

    markdown = _LINK_RE.sub(replace, markdown)
    # The README's title, "batchio", would take the anchor `batchio`, which is the API
    # reference's identifier for the package: autorefs then finds two targets for it.
    return _TITLE_RE.sub(r"\g<1> { #home }", markdown, count=1)


def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    """Register ``doc:<page>`` for each page, for the ``:doc:`` role of the docstrings."""
    autorefs: Any = config.plugins["autorefs"]
    for file in files.documentation_pages():
        page = file.src_uri.removesuffix(".md")
        autorefs.register_url(f"{DOC_PREFIX}{page}", file.url)
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, **kwargs: Any) -> str:
    """Put the README, its links rebased, where a page includes it."""
    if README_DIRECTIVE not in markdown:
        return markdown
    readme = Path(config.config_file_path).parent / "README.md"
    return markdown.replace(
        README_DIRECTIVE, rebase_readme_links(readme.read_text(encoding="utf-8"))
    )
