"""Griffe extension for the docs site: Sphinx roles become autorefs, and public names need docstrings.

The source docstrings are written with Sphinx roles (``:class:`~batchio.Stages```,
``:meth:`submit_nowait```, ``:doc:`concepts```) so they read well in ``help()`` and in an editor.
mkdocstrings renders Markdown, so at build time this extension rewrites each role into a
mkdocs-autorefs cross-reference (``[`Stages`][batchio.Stages]``), resolving relative names the way
Sphinx would: from the innermost scope of the object the docstring belongs to outwards, then as an
absolute path, then as the unique public object of that name. A role that names something outside
the documented API (a private helper, ``threading.Event``) becomes inline code, since there is no
page to link to; one that names nothing at all, in a public docstring, is a warning.

It also warns for every public object without a docstring: the names in each public module's
``__all__`` (``batchio``, ``batchio.testing``, ``batchio.integrations.*``) and the public methods and
properties of the classes among them. Under ``mkdocs build --strict`` a warning fails the build, so
an undocumented export fails CI.

Configured in ``mkdocs.yml`` under the python handler's ``extensions``; the checks are plain
functions (:func:`missing_docstrings`, :func:`convert_roles`) so tests can call them on a package
loaded by griffe directly.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import griffe

_logger = griffe.get_logger("batchio_docs")

ROLE_RE = re.compile(
    r":(?:py:)?(?P<role>class|meth|func|attr|data|exc|mod|obj|const|doc):`(?P<body>[^`]+)`"
)
"""A Sphinx cross-reference role, with or without the ``py:`` domain."""

_TITLED_RE = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$", re.DOTALL)

# RST's "text::" announces a literal block; in Markdown the indented block alone is the code block.
_LITERAL_ONLY_RE = re.compile(r"^[ \t]*::[ \t]*\n", re.MULTILINE)
_LITERAL_AFTER_RE = re.compile(r"(?<=\S)::[ \t]*$", re.MULTILINE)

_PARAMS_HEADER_RE = re.compile(
    r"^(?P<indent>[ \t]*)(?:Args|Arguments|Parameters|Keyword Args|Keyword Arguments):[ \t]*$"
)
_GROUPED_ITEM_RE = re.compile(
    r"^(?P<names>\*{0,2}\w+(?:[ \t]*,[ \t]*\*{0,2}\w+)+)[ \t]*:(?P<rest>.*)$"
)

DOC_PREFIX = "doc:"
"""Autorefs identifiers for pages: ``doc:concepts`` is ``docs/concepts.md`` (see ``hooks.py``)."""


@dataclass
class ApiIndex:
    """The documented API of a package: what a cross-reference may link to.

    Attributes:
        public: public path (``batchio.Batcher.submit_nowait``) -> the object rendered there.
        canonical: canonical path (``batchio._batcher.Batcher``) -> its public path.
    """

    public: dict[str, griffe.Object] = field(default_factory=dict)
    canonical: dict[str, str] = field(default_factory=dict)

    def lookup(self, path: str) -> str | None:
        """Return the public path of ``path`` (public or canonical), or ``None``."""
        if path in self.public:
            return path
        return self.canonical.get(path)


def _is_public_name(name: str) -> bool:
    return not name.startswith("_") or name == "__call__"


def public_modules(package: griffe.Module) -> Iterator[griffe.Module]:
    """Yield ``package`` and its public submodules, recursively (no ``_``-prefixed path part)."""
    yield package
    for name, member in package.members.items():
        if name.startswith("_") or member.is_alias or not isinstance(member, griffe.Module):
            continue
        yield from public_modules(member)


def exported_names(module: griffe.Module) -> list[str]:
    """The names a module exports: its ``__all__``, or else what it defines without a ``_``."""
    if module.exports is not None:
        # Griffe expands `__all__ += other.__all__` before this runs; what it could not expand
        # (an expression, not a name) exports nothing we can document.
        return [
            name for name in module.exports if isinstance(name, str) and not name.startswith("__")
        ]
    return [
        name
        for name, member in module.members.items()
        if not name.startswith("_") and not member.is_alias and not member.is_module
    ]


def _final(obj: griffe.Object | griffe.Alias) -> griffe.Object | None:
    if isinstance(obj, griffe.Alias):
        try:
            return obj.final_target
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
    return obj


def class_members(cls: griffe.Class) -> Iterator[tuple[str, griffe.Object]]:
    """Yield the public members a class declares itself (inherited ones are documented upstream)."""
    for name, member in cls.members.items():
        if member.is_alias or not _is_public_name(name):
            continue
        assert isinstance(member, griffe.Object)
        yield name, member


def build_index(package: griffe.Module) -> ApiIndex:
    """Collect the documented API of ``package`` (see :class:`ApiIndex`)."""
    index = ApiIndex()
    for module in public_modules(package):
        index.public[module.path] = module
        index.canonical.setdefault(module.path, module.path)
        for name in exported_names(module):
            if name not in module.members:
                continue
            target = _final(module.members[name])
            if target is None:
                continue
            path = f"{module.path}.{name}"
            index.public[path] = target
            # The first public module to export an object owns its canonical path: `batchio` is
            # walked before the integrations that re-export some of its names.
            index.canonical.setdefault(target.path, path)
            if isinstance(target, griffe.Class):
                for member_name, member in class_members(target):
                    member_path = f"{path}.{member_name}"
                    index.public[member_path] = member
                    index.canonical.setdefault(member.path, member_path)
    return index


def missing_docstrings(package: griffe.Module) -> list[str]:
    """Return the public paths of documented-API objects that have no docstring.

    Checked: each public module that exports anything, each name in its exports, and the
    public methods and properties a class among them declares (attributes may be described in
    the class's ``Attributes:``).
    """
    missing: list[str] = []
    for path, obj in build_index(package).public.items():
        if isinstance(obj, griffe.Module) and not exported_names(obj):
            continue  # a namespace such as `batchio.integrations`: no page of its own
        # Members: methods and properties need a docstring; attributes may be described in the
        # class's own `Attributes:` section instead.
        if (
            isinstance(obj.parent, griffe.Class)
            and not obj.is_class
            and not obj.is_function
            and not obj.has_labels("property")  # griffe models a property as an attribute
        ):
            continue
        # Special methods (`__call__`) are described by their class's docstring.
        if path.rpartition(".")[2].startswith("__"):
            continue
        if obj.docstring is None or not obj.docstring.value.strip():
            missing.append(path)
    return missing


def _rendered(index: ApiIndex, public_path: str) -> str:
    """The nearest rendered heading for ``public_path``: undocumented objects get no heading."""
    path = public_path
    while path in index.public:
        obj = index.public[path]
        if obj.is_module or (obj.docstring is not None and obj.docstring.value.strip()):
            return path
        path = path.rpartition(".")[0]
    return public_path


def _scopes(obj: griffe.Object) -> Iterator[griffe.Object]:
    current: griffe.Object | None = obj
    while current is not None:
        if not (current.is_function or current.is_attribute):
            yield current
        current = current.parent


def _exists(obj: griffe.Object | griffe.Alias, rest: str) -> bool:
    """Whether ``obj`` has the (dotted) member ``rest``; true past anything not loaded."""
    current: griffe.Object | griffe.Alias = obj
    for part in rest.split(".") if rest else ():
        target = _final(current)
        if target is None:
            return True  # an import from outside the package (`threading`): not ours to judge
        if part not in target.members:
            return False
        current = target.members[part]
    return True


def resolve(target: str, context: griffe.Object, index: ApiIndex) -> tuple[str | None, bool]:
    """Resolve a role's target as Sphinx would, from the docstring of ``context``.

    Returns:
        ``(public_path, known)``: the public path to link to (``None`` when the target is not part
        of the documented API), and whether the target names anything at all (a private object, or
        an external name such as ``threading.Event``, is known but not linked).
    """
    head, _, rest = target.partition(".")
    for scope in _scopes(context):
        found = index.lookup(f"{scope.path}.{target}")
        if found is not None:
            return found, True
        if head in scope.members:
            member = scope.members[head]
            if isinstance(member, griffe.Alias):
                base = member.target_path
            else:
                base = member.path
            full = f"{base}.{rest}" if rest else base
            found = index.lookup(full)
            return found, found is not None or _exists(member, rest)
    found = index.lookup(target)
    if found is not None:
        return found, True
    # Last, the one public object of that name (`Collator` from a module that never imports
    # it), and its member for a dotted name (`Collator.prepare`).
    named = [path for path in index.public if path.rpartition(".")[2] == head]
    if len(named) == 1:
        if not rest:
            return named[0], True
        found = index.lookup(f"{named[0]}.{rest}")
        return found, found is not None or _exists(index.public[named[0]], rest)
    if "." not in target:
        return None, bool(named)
    # A dotted name that is not ours (threading.Event) is external; a dotted batchio name that
    # resolves nowhere is a typo.
    return None, head != context.package.name


def convert_roles(
    text: str, context: griffe.Object, index: ApiIndex, *, check: bool = True
) -> tuple[str, list[str]]:
    """Rewrite the Sphinx roles of one docstring into Markdown cross-references.

    Args:
        text: the docstring.
        context: the object the docstring belongs to (relative names resolve from there).
        index: the documented API.
        check: report targets that name nothing (set for docstrings that get rendered).

    Returns:
        The rewritten docstring, and a message per unresolvable target.
    """
    problems: list[str] = []

    def replace(match: re.Match[str]) -> str:
        role = match["role"]
        body = " ".join(match["body"].split())
        suppress = body.startswith("!")
        body = body.lstrip("!")
        titled = _TITLED_RE.match(body)
        if titled:
            title, target = titled["title"], titled["target"].strip()
        else:
            title, target = None, body
        short = target.startswith("~")
        target = target.lstrip("~").removesuffix("()")
        if role == "doc":
            page = target.removesuffix(".md").strip("/")
            return f"[{title or page}][{DOC_PREFIX}{page}]"
        if title is None:
            title = target.rpartition(".")[2] if short else target
            if role in {"meth", "func"}:
                title += "()"
        shown = f"`{title}`"
        if suppress:
            return shown
        public_path, known = resolve(target, context, index)
        if public_path is None:
            if check and not known:
                problems.append(f"{context.path}: {match[0]} names no object")
            return shown
        return f"[{shown}][{_rendered(index, public_path)}]"

    converted = ROLE_RE.sub(replace, split_grouped_params(text))
    converted = _LITERAL_ONLY_RE.sub("", converted)
    converted = _LITERAL_AFTER_RE.sub(":", converted)
    return converted, problems


def split_grouped_params(text: str) -> str:
    """Give each name of a grouped ``Args:`` entry (``a, b: text``) an entry of its own.

    The docstrings group parameters that share a description; Google style (and griffe, which
    then warns that no parameter is called ``a, b``) wants one entry per parameter.
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        header = _PARAMS_HEADER_RE.match(line)
        if header is None:
            continue
        base = len(header["indent"])
        item_indent: int | None = None
        while i < len(lines):
            line = lines[i]
            indent = len(line) - len(line.lstrip())
            if line.strip() and indent <= base:
                break  # the section ended
            if item_indent is None and line.strip():
                item_indent = indent
            grouped = _GROUPED_ITEM_RE.match(line.strip()) if indent == item_indent else None
            if grouped is None:
                out.append(line)
                i += 1
                continue
            # The entry's own continuation lines go with each of its names.
            j = i + 1
            while j < len(lines) and (
                not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent
            ):
                j += 1
            while j > i + 1 and not lines[j - 1].strip():
                j -= 1
            for name in grouped["names"].split(","):
                out.append(f"{' ' * indent}{name.strip()}:{grouped['rest']}")
                out.extend(lines[i + 1 : j])
            i = j
    return "\n".join(out)


_DOC_COMMENT_RE = re.compile(r"^\s*#:(?: |$)(?P<text>.*)$")
_TRAILING_DOC_COMMENT_RE = re.compile(r"\s#:\s(?P<text>.*)$")


def comment_docstring(attr: griffe.Object) -> str | None:
    """The Sphinx doc-comment of an attribute: ``#:`` lines right above it, or one trailing it.

    Sphinx's autodoc reads these (``#: The name of the span.`` over ``BATCH_SPAN = ...``); griffe
    does not, so without this an attribute documented that way would count as undocumented.
    """
    if attr.lineno is None or attr.filepath is None or isinstance(attr.filepath, list):
        return None
    try:
        lines = attr.lines_collection[attr.filepath]
    except KeyError:
        return None
    above: list[str] = []
    number = attr.lineno - 2  # the line above, 0-based
    while number >= 0 and (match := _DOC_COMMENT_RE.match(lines[number])):
        above.insert(0, match["text"])
        number -= 1
    if above:
        return "\n".join(above)
    trailing = _TRAILING_DOC_COMMENT_RE.search(lines[attr.lineno - 1])
    return trailing["text"] if trailing else None


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            assert isinstance(member, griffe.Object)
            yield from _walk(member)


def process_package(
    package: griffe.Module,
    *,
    allow_undocumented: Collection[str] = (),
    parser: griffe.DocstringStyle | griffe.Parser | None = None,
    parser_options: Any = None,
) -> list[str]:
    """Convert every docstring of ``package`` in place; return the problems, one message each.

    Attributes documented by a ``#:`` comment get it as their docstring first (parsed with
    ``parser`` and ``parser_options``, the loader's).

    Problems: a public object without a docstring (unless its path is in ``allow_undocumented``),
    an ``allow_undocumented`` entry that no longer applies, and a role in a rendered docstring
    that names nothing.
    """
    for obj in _walk(package):
        if obj.is_attribute and obj.docstring is None and (text := comment_docstring(obj)):
            obj.docstring = griffe.Docstring(
                text,
                lineno=obj.lineno,
                parent=obj,
                parser=parser,
                parser_options=parser_options,
            )
    index = build_index(package)
    rendered = {id(obj) for obj in index.public.values()}
    missing = missing_docstrings(package)
    problems = [
        f"{path}: public object has no docstring"
        for path in missing
        if path not in allow_undocumented
    ]
    problems.extend(
        f"{path}: listed in allow_undocumented but documented or gone; remove the entry"
        for path in allow_undocumented
        if path not in missing
    )
    for obj in _walk(package):
        if obj.docstring is None:
            continue
        value, found = convert_roles(obj.docstring.value, obj, index, check=id(obj) in rendered)
        obj.docstring.value = value
        problems.extend(found)
    return problems


class SphinxRoles(griffe.Extension):
    """The griffe extension: run :func:`process_package` on each loaded package, log problems.

    Args:
        packages: the packages to process (others, such as dependencies, are left alone).
        allow_undocumented: public paths excused from the docstring check, for now.
    """

    def __init__(
        self, packages: list[str] | None = None, allow_undocumented: list[str] | None = None
    ) -> None:
        super().__init__()
        self.packages = packages or ["batchio"]
        self.allow_undocumented = list(allow_undocumented or ())

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Convert the package's docstrings and warn about each problem (fails ``--strict``)."""
        if pkg.name not in self.packages:
            return
        for problem in process_package(
            pkg,
            allow_undocumented=self.allow_undocumented,
            parser=loader.docstring_parser,
            parser_options=loader.docstring_options,
        ):
            _logger.warning(problem)
