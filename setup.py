"""Build: the modules on the request path (compiled-modules.txt) are compiled to C by mypyc.

mypyc turns the same type-annotated Python into C extension modules: nothing is written
twice, and the Python source stays the one to read and change. `BILAYER_COMPILE=0` installs
the Python modules alone (same behaviour, more CPU per request); it also removes extension
modules an earlier in-place build left beside the sources, which would otherwise be imported
instead of them.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def compiled_modules() -> list[str]:
    lines = (ROOT / "compiled-modules.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def extensions() -> list[object]:
    modules = compiled_modules()
    if os.environ.get("BILAYER_COMPILE", "1") == "0":
        for module in modules:
            for built in (ROOT / module).parent.glob(Path(module).stem + ".cpython-*.so"):
                built.unlink()
        return []
    from mypyc.build import mypycify

    # The build environment holds only pyproject's build requirements: a library without
    # stubs there is typed Any, which makes its calls dynamic, as in Python.
    flags = ["--ignore-missing-imports", "--follow-imports=silent", "--no-warn-unused-ignores"]
    return list(mypycify([*flags, *modules], opt_level="3"))


setup(ext_modules=extensions())
