"""The request path runs compiled (setup.py builds it with mypyc), and the tests exercise the
compiled modules: an install that silently fell back to Python would cost several times the
CPU per request without any test noticing."""

from __future__ import annotations

import importlib
import os

import pytest

from .conftest import compiled_sources


def compiled_modules() -> list[str]:
    return [path.removesuffix(".py").replace("/", ".") for path in compiled_sources()]


@pytest.mark.skipif(os.environ.get("BILAYER_COMPILE") == "0", reason="BILAYER_COMPILE=0: Python source only")
@pytest.mark.parametrize("name", compiled_modules())
def test_the_request_path_is_compiled(name: str) -> None:
    module = importlib.import_module(name)
    origin = module.__file__ or ""
    assert origin.endswith(".so"), f"{name} was imported from {origin}: `make install` compiles it"
