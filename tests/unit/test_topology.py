"""The topology's names, policies and the shop's messenger.yaml, without a broker."""

from __future__ import annotations

import yaml

from myshop_ops.adapters.broker import SHOP_ROUTING_KEY, Topology
from myshop_ops.adapters.management import management_url
from myshop_ops.tools.transports import SHOP_MESSAGE_CLASS, _effective, messenger_config


def test_queues_are_declared_with_their_type_only_and_the_rest_is_policy():
    topo = Topology(queue="ev", failed_queue="dead", retry_delays_ms=(100, 200))
    assert topo.main_arguments() == {"x-queue-type": "quorum"}
    policies = {p.name: p for p in topo.policies()}
    assert set(policies) == {"myshop.ev", "myshop.ev.exchange", "myshop.ev.retry.1", "myshop.ev.retry.2"}
    assert policies["myshop.ev"].definition == {"dead-letter-exchange": "dead", "dead-letter-routing-key": "dead",
                                                "delivery-limit": 10}
    assert policies["myshop.ev.exchange"].apply_to == "exchanges"
    assert policies["myshop.ev.exchange"].definition == {"alternate-exchange": "ev.unrouted"}
    assert policies["myshop.ev.retry.2"].definition == {"message-ttl": 200, "dead-letter-exchange": "ev",
                                                        "dead-letter-routing-key": "ev"}
    assert "delivery-limit" not in {p.name: p for p in Topology(queue_type="classic").policies()}[
        "myshop.user_embedding_updates"].definition  # classic queues have no delivery limit


def test_policy_patterns_match_their_object_only():
    topo = Topology(queue="shop.events")
    [main] = [p for p in topo.policies() if p.name == "myshop.shop.events"]
    assert main.pattern == r"^shop\.events$"  # a dot is not "any character": shopXevents is not ours


def test_the_queue_is_bound_with_its_own_name_and_the_producers_keys_once_each():
    assert Topology().routing_keys == ("user_embedding_updates", SHOP_ROUTING_KEY)
    assert Topology(queue="q", binding_keys=("q", "a", "a")).routing_keys == ("q", "a")
    assert Topology().queues()[-1] == "user_embedding_updates.unrouted"


def test_the_effective_policy_is_the_highest_priority_match():
    policies = [{"name": "ha-all", "pattern": ".*", "apply-to": "all", "priority": 0},
                {"name": "myshop.q", "pattern": "^q$", "apply-to": "queues", "priority": 10},
                {"name": "broken", "pattern": "(?<", "apply-to": "all", "priority": 99}]
    assert _effective(policies, "queues", "q") == "myshop.q"
    assert _effective(policies, "exchanges", "q") == "ha-all"  # ours applies to queues only
    assert _effective([*policies, {"name": "ops", "pattern": "^q", "apply-to": "queues", "priority": 20}],
                      "queues", "q") == "ops"  # shadowed: preflight reports it
    assert _effective([], "queues", "q") is None


def test_messenger_config_is_yaml_the_shop_can_load_with_the_live_arguments():
    topo = Topology(binding_keys=("user.embedding.update", "legacy.key"))
    text = messenger_config(topo, {"x-queue-type": "quorum", "x-max-length": 1000}, "amqp://shop:***@rabbit:5672/%2f")
    config = yaml.safe_load(text)["framework"]["messenger"]
    options = config["transports"]["user_embedding_updates"]["options"]
    assert options["auto_setup"] is True and options["confirm_timeout"] == 5
    assert options["exchange"] == {"name": "user_embedding_updates", "type": "direct",
                                   "default_publish_routing_key": "user.embedding.update"}
    assert options["queues"]["user_embedding_updates"] == {
        "binding_keys": ["user.embedding.update", "legacy.key"],
        "arguments": {"x-queue-type": "quorum", "x-max-length": 1000}}
    assert config["routing"] == {SHOP_MESSAGE_CLASS: "user_embedding_updates"}
    assert "failure_transport" not in config and "***" in text  # the DSN example never carries the password
    empty = yaml.safe_load(messenger_config(topo, {}, "amqp://x", auto_setup=False))["framework"]["messenger"]
    assert empty["transports"]["user_embedding_updates"]["options"]["queues"]["user_embedding_updates"][
        "arguments"] == {}


def test_the_management_api_defaults_to_the_brokers_host_with_its_credentials():
    assert management_url(None, "amqp://u:p%40ss@rabbit-1:5672/%2f,amqp://u:p@rabbit-2/%2f") == \
        "http://u:p%40ss@rabbit-1:15672"
    assert management_url(None, "amqps://rabbit/%2f") == "https://guest:guest@rabbit:15671"
    assert management_url("http://m:15672", "amqp://x") == "http://m:15672"


def test_failed_messages_expire_by_policy_when_a_retention_is_set():
    assert not [p for p in Topology().policies() if p.target == "failed"]  # 0: kept until removed
    [policy] = [p for p in Topology(failed_retention_days=30).policies() if p.target == "failed"]
    assert policy.definition == {"message-ttl": 30 * 86_400_000} and policy.apply_to == "queues"
