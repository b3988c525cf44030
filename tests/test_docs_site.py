"""The docs site's tooling (docs/_tools): the docstring check, the role conversion, the hooks.

``make test`` runs ``mkdocs build --strict`` on the real site; these tests show that the checks
it relies on fire, on small packages written for the purpose, loaded by griffe as mkdocstrings
loads batchio.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import griffe
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "docs" / "_tools"


def _load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_docs_tools_{name}", TOOLS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


roles = _load_tool("griffe_roles")
hooks = _load_tool("hooks")

_PACKAGE = {
    "__init__.py": '''
        """A package for the tests."""

        from ._impl import LIMIT as LIMIT
        from ._impl import NAMES as NAMES
        from ._impl import Klass as Klass
        from ._impl import Undocumented as Undocumented
        from ._impl import documented as documented

        __all__ = ["LIMIT", "NAMES", "Klass", "Undocumented", "__version__", "documented"]
        __version__ = "1"
    ''',
    "_impl.py": '''
        """Private implementation."""

        import threading

        #: The limit, documented the Sphinx way,
        #: over two lines.
        LIMIT = 3

        # A plain comment documents nothing.
        NAMES = ("a", "b")

        def documented() -> None:
            """See :class:`~pkg.Klass`, :meth:`Klass.method` and :doc:`concepts`."""


        def _helper() -> None:
            pass


        class Undocumented:
            pass


        class Klass:
            """A class; see :meth:`method`, :attr:`value`, :class:`threading.Event`.

            Args:
                a, b: shared; see :func:`documented`.
                c: its own.
            """

            value: int = 0

            def __init__(self, a: int, b: int, c: int) -> None:
                self.a = a

            def __call__(self) -> None:
                pass

            def method(self) -> None:
                """Documented; see :meth:`other` and :meth:`Title <pkg.Klass.method>`."""

            def other(self) -> None:
                pass

            @property
            def prop(self) -> int:
                return 1

            def _private(self) -> None:
                pass
    ''',
    "sub.py": '''
        """A public submodule."""

        __all__ = ["exported"]


        def exported() -> None:
            pass


        def not_exported() -> None:
            pass
    ''',
    "nodoc.py": '''
        __all__ = ["f"]


        def f() -> None:
            """Documented, but its module is not."""
    ''',
    "_hidden/__init__.py": """
        def public_looking() -> None:
            pass
    """,
}
PACKAGE = {name: textwrap.dedent(text).lstrip() for name, text in _PACKAGE.items()}


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def _load(root: Path, **kwargs: Any) -> griffe.Module:
    module = griffe.load("pkg", search_paths=[str(root)], **kwargs)
    assert isinstance(module, griffe.Module)
    return module


def test_missing_docstrings_flags_exported_objects_and_their_public_methods(
    tmp_path: Path,
) -> None:
    """Exports and their public methods and properties need docstrings; nothing private does."""
    package = _load(_write_package(tmp_path, PACKAGE))

    # `LIMIT`'s `#:` comment becomes its docstring in process_package, not before.
    assert sorted(roles.missing_docstrings(package)) == [
        "pkg.Klass.other",
        "pkg.Klass.prop",
        "pkg.LIMIT",
        "pkg.NAMES",
        "pkg.Undocumented",
        "pkg.nodoc",
        "pkg.sub.exported",
    ]


def test_a_fully_documented_package_passes(tmp_path: Path) -> None:
    """The check has no false positives: document what it flagged and it is satisfied."""
    files = dict(PACKAGE)
    files["_impl.py"] = (
        files["_impl.py"]
        .replace("class Undocumented:\n    pass", 'class Undocumented:\n    """Now."""')
        .replace(
            "def other(self) -> None:\n        pass", 'def other(self) -> None:\n        """N."""'
        )
        .replace("return 1", '"""N."""\n        return 1')
        .replace(
            '# A plain comment documents nothing.\nNAMES = ("a", "b")',
            'NAMES = ("a", "b")  #: a trailing doc-comment',
        )
    )
    files["nodoc.py"] = '"""Now documented."""\n\n' + files["nodoc.py"]
    files["sub.py"] = files["sub.py"].replace(
        "def exported() -> None:\n    pass", 'def exported() -> None:\n    """N."""'
    )
    package = _load(_write_package(tmp_path, files))

    assert roles.process_package(package) == []
    assert (
        package["_impl"]["LIMIT"].docstring.value
        == "The limit, documented the Sphinx way,\nover two lines."
    )
    assert package["_impl"]["NAMES"].docstring.value == "a trailing doc-comment"


def test_roles_become_autorefs(tmp_path: Path) -> None:
    """Roles resolve like Sphinx: from the docstring's scope out, to the public path."""
    package = _load(_write_package(tmp_path, PACKAGE))
    index = roles.build_index(package)

    function = package["_impl"]["documented"]
    text, problems = roles.convert_roles(function.docstring.value, function, index)
    assert text == (
        "See [`Klass`][pkg.Klass], [`Klass.method()`][pkg.Klass.method] and "
        "[concepts][doc:concepts]."
    )
    assert problems == []

    method = package["_impl"]["Klass"]["method"]
    text, problems = roles.convert_roles(method.docstring.value, method, index)
    # `other` has no docstring, so no heading: the link goes to its class.
    assert text == "Documented; see [`other()`][pkg.Klass] and [`Title`][pkg.Klass.method]."
    assert problems == []

    # From a module that never imports it, a name is the one public object so named.
    sub = package["sub"]
    text, problems = roles.convert_roles(":meth:`Klass.method`, :meth:`Klass.nope`", sub, index)
    assert text == "[`Klass.method()`][pkg.Klass.method], `Klass.nope()`"
    assert problems == ["pkg.sub: :meth:`Klass.nope` names no object"]


def test_external_and_private_targets_become_code_and_typos_are_reported(tmp_path: Path) -> None:
    """``threading.Event`` and private helpers are not linked; a name of nothing is a problem."""
    package = _load(_write_package(tmp_path, PACKAGE))
    index = roles.build_index(package)
    klass = package["_impl"]["Klass"]

    text, problems = roles.convert_roles(
        ":class:`threading.Event`, :func:`_helper`, :meth:`metod`, :class:`pkg.Nothing`",
        klass,
        index,
    )
    assert text == "`threading.Event`, `_helper()`, `metod()`, `pkg.Nothing`"
    assert problems == [
        "pkg._impl.Klass: :meth:`metod` names no object",
        "pkg._impl.Klass: :class:`pkg.Nothing` names no object",
    ]
    # Docstrings that are not rendered are converted, never reported.
    assert roles.convert_roles(":meth:`metod`", klass, index, check=False)[1] == []


def test_rst_literal_markers_are_dropped() -> None:
    """RST's ``text::`` before a literal block reads as ``text:`` in Markdown; a bare ``::`` goes."""
    package_free = "Use it::\n\n    code\n\n::\n\n    more\n"
    text, _ = roles.convert_roles(package_free, griffe.Module("m"), roles.ApiIndex())

    assert text == "Use it:\n\n    code\n\n\n    more\n"


def test_grouped_args_get_one_entry_each() -> None:
    """``a, b: text`` in ``Args:`` becomes ``a: text`` and ``b: text``, continuation included."""
    text = "Args:\n    a, b: shared\n        more.\n    c: own\n\nReturns:\n    x, y: kept\n"

    assert roles.split_grouped_params(text) == (
        "Args:\n    a: shared\n        more.\n    b: shared\n        more.\n    c: own\n"
        "\nReturns:\n    x, y: kept\n"
    )


def test_the_extension_warns_through_griffes_logger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Loaded as mkdocstrings loads it, the extension logs one warning a problem (so --strict
    fails), honours its allow-list and flags allow-list entries that no longer apply."""
    root = _write_package(tmp_path, PACKAGE)
    extension = roles.SphinxRoles(
        packages=["pkg"], allow_undocumented=["pkg.Undocumented", "pkg.documented"]
    )
    with caplog.at_level(logging.WARNING):
        package = _load(root, extensions=griffe.load_extensions(extension))

    warnings = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert warnings == [
        "pkg.Klass.other: public object has no docstring",
        "pkg.Klass.prop: public object has no docstring",
        "pkg.NAMES: public object has no docstring",
        "pkg.documented: listed in allow_undocumented but documented or gone; remove the entry",
        "pkg.nodoc: public object has no docstring",
        "pkg.sub.exported: public object has no docstring",
    ]
    docstring = package["_impl"]["Klass"].docstring
    assert "[`threading.Event`]" not in docstring.value
    assert "    a: shared; see [`documented()`][pkg.documented]." in docstring.value
    assert docstring.parsed  # Google style parses, the grouped names split


def test_readme_links_are_rebased_for_the_site() -> None:
    """The home page is the README: its links to docs/ and root files must work from docs/."""
    readme = (
        "# batchio\n\nSee [concepts](docs/concepts.md#the-policy), [log](CHANGELOG.md), "
        "[the app](examples/fastapi_app.py), [x](https://example.org/a.md) and [top](#license).\n"
    )

    assert hooks.rebase_readme_links(readme) == (
        "# batchio { #home }\n\nSee [concepts](concepts.md#the-policy), [log](changelog.md), "
        "the app, [x](https://example.org/a.md) and [top](#license).\n"
    )


def test_every_public_module_has_a_reference_page_in_the_nav() -> None:
    """A new public module (with exports) must get an API page, or its docstrings go unread."""
    package = griffe.load("batchio", search_paths=[str(ROOT)])
    assert isinstance(package, griffe.Module)
    modules = {m.path for m in roles.public_modules(package) if roles.exported_names(m)}
    pages = re.findall(
        r"^\s+- [^:]+: (reference/\S+\.md)$",
        ROOT.joinpath("mkdocs.yml").read_text(encoding="utf-8"),
        re.MULTILINE,
    )
    documented = {
        line.removeprefix("::: ").strip()
        for page in pages
        for line in (ROOT / "docs" / page).read_text(encoding="utf-8").splitlines()
        if line.startswith("::: ")
    }

    assert modules - documented == set()


@pytest.mark.timeout(120)
def test_a_strict_build_fails_on_an_undocumented_export(tmp_path: Path) -> None:
    """End to end, as ``make test`` runs it: mkdocs --strict with this extension and hooks fails
    on the undocumented objects, and a ``:doc:`` role to an existing page resolves."""
    _write_package(tmp_path, PACKAGE)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("::: pkg\n", encoding="utf-8")
    (tmp_path / "docs" / "concepts.md").write_text("# Concepts\n", encoding="utf-8")
    (tmp_path / "mkdocs.yml").write_text(
        textwrap.dedent(f"""
            site_name: t
            strict: true
            hooks: ["{TOOLS / "hooks.py"}"]
            plugins:
              - autorefs
              - mkdocstrings:
                  handlers:
                    python:
                      paths: ["{tmp_path}"]
                      options:
                        docstring_style: google
                        extensions:
                          - "{TOOLS / "griffe_roles.py"}:SphinxRoles":
                              packages: [pkg]
        """),
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(tmp_path / "mkdocs.yml")],
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    warnings = sorted(line for line in output.splitlines() if line.startswith("WARNING"))
    assert warnings == [
        f"WARNING -  batchio_docs: {path}: public object has no docstring"
        for path in ("pkg.Klass.other", "pkg.Klass.prop", "pkg.NAMES", "pkg.Undocumented")
    ] + [
        f"WARNING -  batchio_docs: {path}: public object has no docstring"
        for path in ("pkg.nodoc", "pkg.sub.exported")
    ]
    assert "Aborted with 6 warnings in strict mode" in output
