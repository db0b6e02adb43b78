"""Regression test (fixed in Pipeline.process: a second copy in a batch is acked but never marked processed).

Found by the soak (hot users, --prefetch 1000: 1 event of 3,000 lost, no fault injected): when both copies of
a message (a body published twice, e.g. again after a lost publisher confirm) land in the same batch, the second
copy is marked `duplicate` by the in-batch check in `Pipeline._parse` before the first copy's fate is known. If
the first copy then fails transiently (provider 429/5xx/timeout, MongoDB unavailable, VersionConflict after its
re-read budget), it is sent to a retry queue — but the second copy's id has already been written to Redis as
processed (`Pipeline.process` marks `applied` *and* `duplicate` items) and acked. When the retry copy comes
back, Redis says "seen": it is acked as a duplicate too. The event is never applied and is in no queue: lost
(with Redis down it would be applied on the retry)."""

from __future__ import annotations

import pytest

from myshop_ops.base.contract import make_event, serialise
from tests.reliability.harness.plan import Body, Plan
from tests.reliability.harness.scenario import Scenario
from tests.support.events import T0
from tests.support.services import wait_for

pytestmark = pytest.mark.reliability


class KnownBugReproduced(AssertionError):
    pass


def test_both_copies_in_one_batch_and_a_provider_error(renv, workers, tmp_path, fake_openai):
    fake_openai.clear()
    renv.update(EMBEDDING_PROVIDER="openai", OPENAI_API_KEY="test-key", OPENAI_BASE_URL=fake_openai.base_url,
                EMBEDDING_DIMENSIONS="1536", WORKER_RETRY_DELAY="100")
    try:
        sc = Scenario("duplicate-loss", renv, workers, tmp_path)
        event = make_event(f"{sc.tag}-u", "search", f"{sc.tag} running shoes", T0)
        body = Body(serialise(event), event.message_id)
        sc.publish(Plan([body, body], 1, [event.user_id])).join(30)  # the same body twice, before any worker runs
        fake_openai.fail_next(500, times=3)  # the SDK tries 3 times: the batch's one provider call fails once
        sup = sc.start_workers(1, prefetch=10)
        wait_for(lambda: not fake_openai.pending_faults() and "retried later" in sup.slots[0].stderr, timeout=30,
                 what="the first copy sent to a retry queue")
        def settled() -> bool:  # the retry copy came back and was processed: nothing left anywhere
            ready = sc.probe.ready()
            return (sup.slots[0].stderr.count("batch settled") >= 2 and ready is not None
                    and sc.probe.backlog(ready) == 0)

        wait_for(settled, timeout=30, what=f"the retry copy processed\n{sup.describe(1)}")
        if sc.probe.applied() == 0:
            raise KnownBugReproduced(f"the event was never applied\n{sup.describe(1)}")
        sc.wait_drained(timeout=60)
        sc.finish(expect_restarts=0)
    finally:
        fake_openai.clear()
