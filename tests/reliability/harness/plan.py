"""The planned stream and the run's sizes: what a scenario publishes, decided before anything runs.

:func:`plan_events` draws N users x M distinct valid events of the four types (shuffled, so out of order, a
share of them late, a share published twice, adjacent or far apart) into a :class:`Plan` of :class:`Body`
publishes; :func:`interleave` merges such streams (valid events with malformed bodies, say) keeping each one's
order. ``sized(regular, soak)`` picks the second size when ``SOAK=1``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from myshop_ops.base.contract import make_event, serialise
from tests.support.events import T0

SOAK = os.environ.get("SOAK", "") == "1"
EVENT_TYPES = ("search", "product_view", "product_click", "product_purchase")


def sized(regular, soak):
    """The regular size, or the soak size when SOAK=1."""
    return soak if SOAK else regular


@dataclass(frozen=True)
class Body:
    """One publish: the bytes, the AMQP message_id and content type, and whether the contract accepts it."""

    body: bytes
    message_id: str | None
    valid: bool = True
    content_type: str | None = "application/json"
    kind: str = "event"
    expect: str = ""  # bad bodies: a fragment the failure's error message must contain ("" = any)


@dataclass
class Plan:
    bodies: list[Body]
    distinct: int  # distinct valid events
    users: list[str]
    bad_ids: set[str] = field(default_factory=set)  # message ids that must end in `failed`

    @property
    def published(self) -> int:
        return len(self.bodies)


def plan_events(
    tag: str,
    *,
    users: int,
    per_user: int,
    products: Sequence[str],
    rng: random.Random,
    search_share: float = 0.25,
    late_share: float = 0.15,
    dup_share: float = 0.05,
    unique_phrases: bool = False,
    adjacent_dups: float = 0.5,
    min_gap: int = 250,
) -> Plan:
    """``users`` x ``per_user`` distinct valid events of all four types, shuffled (so out of order), a share
    of them late (occurred weeks before the user's other events), and ``dup_share`` of them published a second
    time (same body, same message id): for the ``adjacent_dups`` share of them right behind the original (a
    producer publishing again after a lost confirm: both copies tend to land in one batch, docs/RELIABILITY.md
    §5.4), for the others at a random position at least ``min_gap`` later (never in the same batch)."""
    user_ids = [f"{tag}-u{i}" for i in range(users)]
    other = (1 - search_share) / 3
    events = []
    seen: set[str] = set()
    for u, user in enumerate(user_ids):
        for k in range(per_user):
            et = rng.choices(EVENT_TYPES, weights=(search_share, other, other, other))[0]
            if rng.random() < late_share:
                when = T0 - timedelta(days=rng.uniform(60, 400))  # late: far behind everything else
            else:
                when = T0 - timedelta(days=rng.uniform(0, 40))
            when = when.replace(microsecond=rng.randrange(1_000_000))
            if et == "search":
                ref = f"{tag} phrase {u} {k}" if unique_phrases else f"{tag} {rng.choice(PHRASES)}"
            else:
                ref = rng.choice(products)
            event = make_event(user, et, ref, when)
            if event.message_id in seen:  # practically impossible (microsecond times), but keep `distinct` exact
                continue
            seen.add(event.message_id)
            events.append(event)
    rng.shuffle(events)
    bodies = [Body(serialise(e), e.message_id) for e in events]
    for _ in range(int(len(events) * dup_share)):
        i = rng.randrange(max(1, len(bodies) - min_gap))
        original = bodies[i]
        later = rng.randrange(min(i + min_gap, len(bodies)), len(bodies) + 1)
        bodies.insert(i + 1 if rng.random() < adjacent_dups else later, original)
    return Plan(bodies, len(events), user_ids)


PHRASES = ("wireless headphones", "running shoes", "coffee grinder", "usb c cable", "standing desk",
           "gaming mouse", "yoga mat", "rain jacket", "espresso machine", "led desk lamp", "hiking boots",
           "mechanical keyboard", "water bottle", "phone case", "air fryer", "bluetooth speaker")


def interleave(rng: random.Random, *streams: list[Body]) -> list[Body]:
    """Merge streams at random positions, each stream keeping its own order."""
    tagged = [(i, b) for i, s in enumerate(streams) for b in s]
    slots = [i for i, _ in tagged]
    rng.shuffle(slots)
    iters = [iter(s) for s in streams]
    return [next(iters[i]) for i in slots]
