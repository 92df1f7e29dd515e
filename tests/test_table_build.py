"""The fast constructor ``_Model.build()`` against pydantic's own validation.

``build()`` writes pydantic's private fields itself (the compiler makes some 200,000
objects per compile at 10,000 routes). These tests pin it: every model of every golden
table, rebuilt with ``build()`` from its validated fields, is the object ``model_validate``
makes, down to the serialized form, the field order and the private attributes; and
every field of every model is exercised with a value other than its default, so a field
added later without a value here (and without build support) fails.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from dataplane import table

from .golden import GOLDEN

MODELS = sorted(
    (
        cls
        for _, cls in inspect.getmembers(table, inspect.isclass)
        if issubclass(cls, table._Model)
        and cls.__module__ == table.__name__
        and not cls.__name__.startswith("_")
    ),
    key=lambda cls: cls.__name__,
)


def golden_tables() -> list[table.Table]:
    tables = []
    for path in sorted(GOLDEN.glob("*.out.yaml")):
        document = yaml.safe_load(path.read_text())
        tables.append(table.Table.parse(document["table"]))
    return tables


# Values the golden tables do not carry: each sets a field no golden case sets.
EXTRA: list[tuple[type[table._Model], dict[str, Any]]] = [
    (
        table.UpstreamTLS,
        {"serverName": "api.example.com", "caCertificates": "PEM", "insecureSkipVerify": True},
    ),
    (table.Rule, {"route": "shop/api", "index": 0, "allowEncodedSlashes": True}),
    (
        table.UDPListener,
        {"source": "dns/udp", "backends": [], "limits": {"clientRate": 10.0, "clientBurst": 20}},
    ),
]


# Fields that have one value.
CONSTANT = {(table.Table, "schema_")}


def models_in(value: Any) -> Iterator[table._Model]:
    """Every model inside value, value first, depth first."""
    if isinstance(value, table._Model):
        yield value
        for name in type(value).model_fields:
            yield from models_in(value.__dict__[name])
    elif isinstance(value, dict):
        for item in value.values():
            yield from models_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from models_in(item)


@pytest.fixture(scope="module")
def samples() -> list[table._Model]:
    found: list[table._Model] = []
    for tbl in golden_tables():
        found.extend(models_in(tbl))
    for cls, data in EXTRA:
        found.extend(models_in(cls.model_validate(data)))
    return found


def _same(built: BaseModel, validated: BaseModel) -> None:
    assert type(built) is type(validated)
    assert built == validated
    assert list(built.__dict__) == list(validated.__dict__)  # the serialized order
    assert built.model_dump_json(by_alias=True) == validated.model_dump_json(by_alias=True)
    assert built.model_dump_json(by_alias=True, exclude_defaults=True) == validated.model_dump_json(
        by_alias=True, exclude_defaults=True
    )
    assert built.__pydantic_private__ == validated.__pydantic_private__
    assert built.__pydantic_extra__ == validated.__pydantic_extra__
    assert built.model_fields_set == validated.model_fields_set


@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
def test_build_makes_what_validation_makes(cls: type[table._Model], samples: list[table._Model]) -> None:
    instances = [m for m in samples if type(m) is cls]
    assert instances, f"no golden table or EXTRA value has a {cls.__name__}: add one"
    for sample in instances:
        # Fresh from validation: a golden table's parts have their hashes cached by now.
        validated = cls.model_validate(sample.model_dump(by_alias=True, exclude_unset=True))
        given = {name: validated.__dict__[name] for name in validated.model_fields_set}
        # As producers call it: only the fields they set, the rest from the defaults.
        _same(cls.build(**given), validated)
        # And with every field given.
        every = {name: validated.__dict__[name] for name in cls.model_fields}
        _same(cls.build(**every), cls.model_validate(validated.model_dump(by_alias=True)))


@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
def test_every_field_is_exercised(cls: type[table._Model], samples: list[table._Model]) -> None:
    """A field that no sample sets to something other than its default is not pinned by
    the test above: a new field must come with a golden case or an EXTRA value."""
    instances = [m for m in samples if type(m) is cls]
    unset = [
        name
        for name, info in cls.model_fields.items()
        if all(m.__dict__[name] == info.get_default(call_default_factory=True) for m in instances)
        and (cls, name) not in CONSTANT
    ]
    assert not unset, f"{cls.__name__}: no golden table or EXTRA value sets {unset}: add one here"


@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
def test_built_objects_share_no_mutable_state(cls: type[table._Model], samples: list[table._Model]) -> None:
    """Fields with factories and private attributes are fresh per object, as pydantic makes them."""
    validated = next(m for m in samples if type(m) is cls)
    given = {name: validated.__dict__[name] for name in validated.model_fields_set}
    first, second = cls.build(**given), cls.build(**given)
    for name in cls.model_fields:
        if name not in given and isinstance(first.__dict__[name], (list, dict, set)):
            assert first.__dict__[name] is not second.__dict__[name], f"{cls.__name__}.{name} is shared"
    assert (first.__pydantic_private__ is None) == (second.__pydantic_private__ is None)
    if first.__pydantic_private__ is not None:
        assert first.__pydantic_private__ is not second.__pydantic_private__
        for name, value in first.__pydantic_private__.items():
            if isinstance(value, (list, dict, set)):
                assert value is not second.__pydantic_private__[name], f"{cls.__name__}.{name} is shared"
