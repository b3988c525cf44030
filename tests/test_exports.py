"""The public surface: exactly the exported names, shown as ``batchio.X``, documented, and light."""

from __future__ import annotations

import inspect
import subprocess
import sys
import types

import batchio


def test_all_lists_exactly_the_public_names() -> None:
    # Submodules (batchio.testing, batchio.integrations) appear here once imported; they are
    # reached by their own import, not re-exported.
    public = {
        name
        for name, obj in vars(batchio).items()
        if not name.startswith("_") and not isinstance(obj, types.ModuleType)
    }
    assert set(batchio.__all__) - {"__version__"} == public


def test_exported_objects_say_batchio() -> None:
    for name in batchio.__all__:
        obj = getattr(batchio, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "batchio", name


def test_every_public_name_has_a_docstring() -> None:
    for name in batchio.__all__:
        obj = getattr(batchio, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), name
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and inspect.isfunction(member):
                    assert inspect.getdoc(member), f"{name}.{attr}"


def test_import_batchio_stays_light() -> None:
    code = (
        "import sys, batchio, batchio.testing; "
        "print(','.join(m for m in ('torch','transformers','numpy','uvloop') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_package_ships_py_typed() -> None:
    from importlib.resources import files

    assert files("batchio").joinpath("py.typed").is_file()
