"""The real adapters and the stand-ins of tests/support/stubs.py both satisfy the core's protocols (ports.py): every
method the core may call exists on both, with the parameters the protocol names."""

from __future__ import annotations

import inspect

import pytest
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from myshop_ops.adapters.dedup import RedisState
from myshop_ops.adapters.embeddings import PhraseEmbedder
from myshop_ops.adapters.store import Store
from myshop_ops.core import ports
from tests.support import stubs

PAIRS = [
    (ports.ProfileStore, Store, stubs.StubStore),
    (ports.EventState, RedisState, stubs.StubRedis),
    (ports.Phrases, PhraseEmbedder, None),  # the stand-in is a provider (StubProvider) behind a real PhraseEmbedder
    (ports.Channel, BlockingChannel, stubs.StubChannel),
    (ports.Connection, BlockingConnection, stubs.StubConnection),
]


def members(protocol: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(value) for name, value in vars(protocol).items()
            if callable(value) and not name.startswith("_")}


@pytest.mark.parametrize(("protocol", "real", "stub"), PAIRS, ids=lambda c: getattr(c, "__name__", ""))
def test_both_sides_have_every_method_with_its_parameters(protocol, real, stub):
    sides = [real] if stub is None else [real, stub]
    assert members(protocol)
    for cls in sides:
        for name, wanted in members(protocol).items():
            assert hasattr(cls, name), f"{cls.__name__} has no {name}"
            got = inspect.signature(getattr(cls, name)).parameters
            for param in list(wanted.parameters)[1:]:
                assert param in got or any(p.kind is p.VAR_KEYWORD for p in got.values()), (cls.__name__, name, param)
