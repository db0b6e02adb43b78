"""`myshop preflight`: the deployment checklist's pre-deployment section as checks, each PASS / WARN / FAIL
with the exact command that fixes it. Nothing here changes state."""

from __future__ import annotations

import grp
import importlib.metadata
import os
import pwd
import re
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pymongo.errors import PyMongoError

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import BrokerError, Topology
from myshop_ops.adapters.config import (
    DISCOVER,
    ConfigError,
    Settings,
    load_settings,
    mask_url,
    merged_env,
    settings_file,
)
from myshop_ops.adapters.dedup import RedisError, RedisState
from myshop_ops.adapters.embeddings import EmbeddingError, embed_all, make_provider
from myshop_ops.adapters.failures import explain
from myshop_ops.adapters.management import Management, ManagementError, WrongBroker, for_connection
from myshop_ops.adapters.release import UNKNOWN, version
from myshop_ops.adapters.store import Store
from myshop_ops.tools.stats import CRITICAL_DEPTH, WARN_DEPTH, Members, alarms
from myshop_ops.tools.transports import Transports

PACKAGES = ("pika", "pymongo", "redis", "openai", "numpy", "typer", "rich", "prometheus-client")
_PLACEHOLDER = re.compile(r"^(sk-\.{3}|sk-x+|<[^>]*>|changeme|change-me|your[-_].*|xxx+|todo|replace[-_ ]?me)$",
                          re.IGNORECASE)
_SECRET_VARS = ("OPENAI_API_KEY", "RABBITMQ_DSN", "MONGODB_URL", "REDIS_URL", "RABBITMQ_MANAGEMENT_URL")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
# the checks that need a service, shown as SKIP (with the failed check named) when it cannot be reached
MONGODB_CHECKS = ("reachable", "indexes", "product vectors")
DATA_CHECKS = ("profiles", "untagged products")
RABBITMQ_CHECKS = ("topology", "consumers", "depth", "failed", "cluster")


@dataclass(frozen=True, slots=True)
class Check:
    section: str
    name: str
    status: str  # PASS | WARN | FAIL | SKIP
    detail: str
    fix: str | None = None

    def as_json(self) -> dict:
        return asdict(self)


def run(env: Mapping[str, str] | None = None, env_file: object = DISCOVER, offline: bool = False) -> list[Check]:
    """Every check, in checklist order. A configuration that does not load stops the service checks. ``env_file``:
    a path, None for none, DISCOVER (default) for the file config.settings_file() names."""
    if env_file is DISCOVER:
        try:
            env_file = settings_file(env)
        except ConfigError as exc:
            return [Check("config", exc.var, "FAIL", str(exc), "give an existing file to --env-file"),
                    Check("services", "all", "SKIP", "the configuration must load first")]
    checks = list(_config(env, env_file))
    try:
        s = load_settings(env, env_file)
    except ConfigError:
        return [*checks, Check("services", "all", "SKIP", "the configuration must load first")]
    checks += _packages()
    checks += _mongodb(s)
    checks += _shop_data(s, _passed(checks, "mongodb", "reachable"))
    checks += _rabbitmq(s)
    checks += _redis(s)
    checks.append(_provider(s) if not offline else Check("provider", "one embedding", "SKIP", "--offline"))
    checks += _security(s, env_file)
    return checks


def _passed(checks: list[Check], section: str, name: str) -> bool:
    return any(c.section == section and c.name == name and c.status == "PASS" for c in checks)


# ---- configuration --------------------------------------------------------------------------------

def _config(env: Mapping[str, str] | None, env_file: str | None) -> Iterator[Check]:
    raw = merged_env(env, env_file)
    try:
        s = load_settings(env, env_file)
    except ConfigError as exc:
        yield Check("config", exc.var, "FAIL", str(exc), f"set {exc.var} in .env (see .env.example)")
        return
    yield Check("config", "variables", "PASS", f"APP_ENV={s.app_env}, every value valid")
    for var in _SECRET_VARS:
        if var == "OPENAI_API_KEY" and s.embedding_provider != "openai":
            continue  # unused by an offline provider: .env.example's placeholder is harmless there
        value = (raw.get(var) or "").strip()
        parts = urlsplit(value) if "://" in value else None
        password = parts.password if parts else value
        if password and _PLACEHOLDER.match(password):
            yield Check("config", var, "FAIL", f"{var} holds a placeholder", f"set the real value of {var} in .env")
    if s.app_env == "prod":
        for var, url in (("RABBITMQ_DSN", s.rabbitmq_dsn), ("RABBITMQ_MANAGEMENT_URL", s.rabbitmq_management_url)):
            for one in (url or "").split(","):
                p = urlsplit(one.strip())
                if p.username == "guest" and p.password == "guest":
                    yield Check("config", var, "FAIL", f"{mask_url(one.strip())} uses guest/guest in prod",
                                "rabbitmqctl add_user myshop '<password>' && rabbitmqctl set_permissions -p / myshop "
                                "'.*' '.*' '.*' && rabbitmqctl set_user_tags myshop monitoring policymaker && set it "
                                "in " + var)
    if s.embedding_provider == "hash":
        yield Check("config", "EMBEDDING_PROVIDER", "WARN", "hash provider: deterministic vectors without meaning",
                    "set EMBEDDING_PROVIDER=openai and OPENAI_API_KEY for real recommendations")


def _packages() -> Iterator[Check]:
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            yield Check("packages", name, "FAIL", f"{name} is not installed", "pip install -e .")
    yield Check("packages", "release", "PASS" if version() != UNKNOWN else "WARN", f"myshop-ops {version()}",
                None if version() != UNKNOWN else "install the release's wheel (CHECKLIST.md step 1)")
    py = ".".join(map(str, sys.version_info[:3]))
    yield Check("packages", "versions", "PASS", f"python {py}, " + ", ".join(versions))


# ---- services -------------------------------------------------------------------------------------

def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t) * 1000


def _skipped(section: str, names: tuple[str, ...], why: str) -> Iterator[Check]:
    """The checks that cannot run because the one ``why`` names failed: shown, not dropped."""
    for name in names:
        yield Check(section, name, "SKIP", why)


def _mongodb(s: Settings) -> Iterator[Check]:
    done: list[str] = []
    try:
        for check in _mongodb_checks(s):
            done.append(check.name)
            yield check
    except PyMongoError as exc:
        failed = next(n for n in MONGODB_CHECKS if n not in done)
        f = explain(exc, s)
        yield Check("mongodb", failed, "FAIL", f"{f.where}: {f.reason}", f.todo)
        rest = tuple(n for n in MONGODB_CHECKS if n not in done and n != failed)
        yield from _skipped("mongodb", rest, f"needs MongoDB: mongodb {failed} failed")


def _mongodb_checks(s: Settings) -> Iterator[Check]:
    store = Store.from_settings(s)  # the timeout every command and worker uses; an unescaped @, an SRV name raise
    try:
        _, ms = _timed(store.ping)
        yield Check("mongodb", "reachable", "PASS", f"{mask_url(s.mongodb_url)} answered in {ms:.0f} ms")
        missing = store.missing_indexes()
        if missing:
            yield Check("mongodb", "indexes", "FAIL", "missing: " + ", ".join(f"{c}.{i}" for c, i in missing),
                        "myshop setup-indexes")
        else:
            yield Check("mongodb", "indexes", "PASS", f"every required index of {s.mongodb_db} exists")
        products = store.count_product_vectors(s.model, s.embedding_dimensions)
        if products:
            yield Check("mongodb", "product vectors", "PASS", f"{products} products embedded with {s.model}")
        else:
            yield Check("mongodb", "product vectors", "WARN",
                        f"no product vectors for {s.model}/{s.embedding_dimensions}d: product events will be skipped",
                        "myshop products import CATALOG.jsonl (the shop's catalog; examples/catalog.jsonl to try)")
    finally:
        store.close()


def _shop_data(s: Settings, reachable: bool) -> Iterator[Check]:
    """What the shop's own code left in the store: profiles per layout, untagged products, indexes not named by
    myshop (CHECKLIST.md, "Cutover from the shop's PHP workers")."""
    if not reachable:
        yield from _skipped("data", DATA_CHECKS, "needs MongoDB: mongodb reachable failed")
        return
    store = None
    try:
        store = Store.from_settings(s)
        d = store.data_report(s.embedding_dimensions)
        foreign = store.foreign_indexes()
    except PyMongoError as exc:
        yield from _skipped("data", DATA_CHECKS, f"MongoDB failed: {explain(exc, s).reason}")
        return
    finally:
        if store is not None:
            store.close()
    other = "profiles_compact" if s.store_layout == "shop" else "profiles_shop_layout"
    level = "WARN" if d["profiles_without_vector"] or (s.store_layout == "shop" and d[other]) else "PASS"
    yield Check("data", "profiles", level,
                f"{d['profiles_shop_layout']} in the shop layout, {d['profiles_compact']} compact, "
                f"{d['profiles_to_adopt']} written by the shop's PHP workers (adopted at their next event), "
                f"{d['profiles_without_vector']} without a vector (their events fail); STORE_LAYOUT={s.store_layout}"
                + (f": the shop's PHP code cannot read the {d[other]} compact ones until their next event"
                   if level == "WARN" and d[other] else ""),
                "myshop user show USER_ID for one of them; CHECKLIST.md cutover" if level == "WARN" else None)
    wrong = d["products_untagged"] - d["products_untagged_usable"]
    yield Check("data", "untagged products", "WARN" if wrong else "PASS",
                f"{d['products_untagged']} product vectors without a model (the shop's sync), "
                f"{d['products_untagged_usable']} of them {s.embedding_dimensions}-d: used as {s.model}"
                + (f"; {wrong} of another length or not an array: their events fail" if wrong else "")
                + (f"; {d['products_without_product_id']} found by productId only"
                   if d["products_without_product_id"] else ""),
                f"re-embed them: myshop products import CATALOG.jsonl (EMBEDDING_DIMENSIONS={s.embedding_dimensions})"
                if wrong else None)
    if foreign:
        yield Check("data", "indexes", "PASS", "not named by myshop: " + ", ".join(
            f"{c}.{n}" + (f" (serves as {req})" if req else "") for c, n, req in foreign))


def _other_consumers(s: Settings, api: Management) -> Iterator[Check]:
    """Consumers of the main queue whose connection is not a myshop one (its client_properties connection_name
    starts with "myshop", broker.connect): the shop's PHP workers, still running, take events myshop never sees."""
    queue = Topology.from_settings(s).queue
    try:
        others = sorted({f"{c['connection_name'] or 'unnamed'} from {c['peer_host']} ({c['user']})"
                         for c in api.consumers(queue)
                         if c["connection_name"] is not None and not c["connection_name"].startswith("myshop")})
    except ManagementError as exc:
        yield Check("rabbitmq", "other consumers", "SKIP", str(exc))
        return
    if others:
        yield Check("rabbitmq", "other consumers", "WARN",
                    f"{len(others)} connection(s) consuming {queue} are not myshop workers: " + "; ".join(others),
                    "stop the shop's PHP workers (messenger:consume) before the cutover: CHECKLIST.md")
    else:
        yield Check("rabbitmq", "other consumers", "PASS", f"every consumer of {queue} is a myshop worker")


def _cluster(s: Settings, api: Management) -> Iterator[Check]:
    """The broker as a cluster (management API): resource alarms (they block every publisher of the cluster), the
    main queue's members (down ones, a lost quorum, fewer than 3 in prod) and a RABBITMQ_DSN that names one node
    of several (nothing to fail over to)."""
    queue = Topology.from_settings(s).queue
    try:
        nodes, info, raised = api.nodes(), api.queue(queue), alarms(api)
    except ManagementError as exc:
        yield Check("rabbitmq", "cluster", "SKIP", str(exc))
        return
    prod = s.app_env == "prod"
    if raised:
        yield Check("rabbitmq", "alarms", "FAIL", "resource alarm on " + ", ".join(
                    f"{a['node']} ({a['kind']})" for a in raised) + ": every publisher of the cluster is blocked "
                    "(retry and failed copies included)",
                    "rabbitmq-diagnostics alarms; free memory or disk on that node")
    members = Members.of(info)
    if members is not None:
        level = ("FAIL" if len(members.online) < members.majority else "WARN" if members.down
                 or (prod and len(members.members) < 3) else "PASS")
        few = f"; fewer than 3 members: losing one node stops {queue}" if prod and len(members.members) < 3 else ""
        yield Check("rabbitmq", "members", level, f"{queue}: {members.describe()}{few}",
                    None if level == "PASS" else "start the nodes that are down (rabbitmq-diagnostics "
                    "cluster_status); add members: rabbitmq-queues grow NODE all")
    urls = len(broker.dsn_urls(s.rabbitmq_dsn))
    running = [n["name"] for n in nodes if n["running"]]
    if len(nodes) > 1 and urls == 1:
        yield Check("rabbitmq", "failover", "WARN" if prod else "PASS",
                    f"RABBITMQ_DSN names 1 of the cluster's {len(nodes)} nodes: workers cannot fail over when it "
                    "stops", "list every node in RABBITMQ_DSN, comma-separated")
    elif nodes:
        yield Check("rabbitmq", "failover", "PASS", f"{len(running)} of {len(nodes)} node(s) running; RABBITMQ_DSN "
                    f"lists {urls} URL(s)")


def _rabbitmq(s: Settings) -> Iterator[Check]:
    topo = Topology.from_settings(s)
    try:
        conn = broker.connect(s.rabbitmq_dsn, name="myshop-preflight")
    except BrokerError as exc:
        yield Check("rabbitmq", "reachable", "FAIL", str(exc), "check RABBITMQ_DSN and that RabbitMQ is running")
        yield from _skipped("rabbitmq", RABBITMQ_CHECKS, "needs RabbitMQ: rabbitmq reachable failed")
        return
    try:
        yield Check("rabbitmq", "reachable", "PASS", mask_url(s.rabbitmq_dsn))
        api, refused = _management(s, conn)
        if api is None:
            yield refused
        else:
            yield from _topology(conn, api, topo)
        main = broker.queue_depth(conn, topo.queue)
        failed = broker.queue_depth(conn, topo.failed_queue)
        if main is not None:
            ready, consumers = main
            if consumers:
                yield Check("rabbitmq", "consumers", "PASS", f"{consumers} consumer(s) on {topo.queue}")
            else:
                yield Check("rabbitmq", "consumers", "WARN", f"no consumer on {topo.queue}",
                            "systemctl start myshop-worker.target, or supervisorctl start 'myshop-worker:*' "
                            "(or: myshop consume)")
            level = "FAIL" if ready > CRITICAL_DEPTH else "WARN" if ready > WARN_DEPTH else "PASS"
            yield Check("rabbitmq", "depth", level, f"{ready} ready on {topo.queue}",
                        None if level == "PASS" else "myshop stats --watch; add workers or find why they stall")
        if failed is not None:
            yield Check("rabbitmq", "failed", "WARN" if failed[0] else "PASS", f"{failed[0]} in {topo.failed_queue}",
                        "myshop failed show --stats" if failed[0] else None)
        if api is None:
            yield Check("rabbitmq", "cluster", "SKIP", "needs the management API of this broker (see topology)")
        else:
            yield from _other_consumers(s, api)
            yield from _cluster(s, api)
    finally:
        conn.close()


def _management(s: Settings, conn) -> tuple[Management | None, Check | None]:
    """The management API of the broker ``conn`` reached, or why not (a FAIL: nothing it tells can be checked)."""
    try:
        return for_connection(s.rabbitmq_management_url, s.rabbitmq_dsn, conn), None
    except ManagementError as exc:
        fix = ("set RABBITMQ_MANAGEMENT_URL to the management API of the broker RABBITMQ_DSN reaches"
               if isinstance(exc, WrongBroker) else
               "rabbitmq-plugins enable rabbitmq_management (or set RABBITMQ_MANAGEMENT_URL)")
        return None, Check("rabbitmq", "topology", "FAIL", f"{exc}: policies and bindings cannot be checked", fix)


def _topology(conn, api: Management, topo: Topology) -> Iterator[Check]:
    """Exchanges, queues (type, arguments overriding policies), the producers' routing keys, policies, and
    anything the alternate exchange caught."""
    try:
        found = Transports(conn, api, topo).check()
    except ManagementError as exc:
        yield Check("rabbitmq", "topology", "FAIL", f"{exc}: policies and bindings cannot be checked",
                    "rabbitmq-plugins enable rabbitmq_management (or set RABBITMQ_MANAGEMENT_URL)")
        return
    except BrokerError as exc:  # a refusal on one object (Refused): named, with what to do
        yield Check("rabbitmq", "topology", "FAIL", str(exc), "myshop setup-transports")
        return
    bindings = [st for st in found if st.kind == "binding"]
    others = [st for st in found if st.kind != "binding"]
    for name, steps, good in (
            ("topology", others, f"{topo.queue} ({topo.queue_type}), {len(topo.retry_delays_ms)} retry queues, "
                                 f"{topo.failed_queue}, {topo.unrouted}; policies applied"),
            ("bindings", bindings, f"routing keys {', '.join(topo.routing_keys)} reach {topo.queue}")):
        if not steps:
            yield Check("rabbitmq", name, "PASS", good)
            continue
        level = "FAIL" if any(st.level == "fail" for st in steps) else "WARN"
        fixes = list(dict.fromkeys(st.fix for st in steps if st.fix))
        yield Check("rabbitmq", name, level, "; ".join(f"{st.kind} {st.name}: {st.state}" + (
            f" ({st.detail})" if st.detail else "") for st in steps), "; ".join(fixes) or None)
    unrouted = broker.queue_depth(conn, topo.unrouted)
    if unrouted is not None and unrouted[0]:
        yield Check("rabbitmq", "unrouted", "WARN", f"{unrouted[0]} message(s) published to {topo.exchange} matched "
                    f"no binding (kept in {topo.unrouted})",
                    "fix the producer's routing key or RABBITMQ_BINDING_KEYS, then myshop unrouted republish")


def _redis(s: Settings) -> Iterator[Check]:
    where = mask_url(s.redis_url)
    state = RedisState(s.redis_url, timeout=3)
    try:
        _, ms = _timed(state.ping)
        yield Check("redis", "reachable", "PASS", f"{where} answered in {ms:.0f} ms")
        policy = state.eviction_policy()
        if policy is None:
            yield Check("redis", "eviction", "WARN", "CONFIG GET is disabled: eviction policy unknown",
                        "ask for maxmemory-policy noeviction or volatile-ttl")
            return
        if policy.startswith("allkeys"):
            yield Check("redis", "eviction", "WARN",
                        f"maxmemory-policy {policy} can evict dedup keys and cached vectors under memory pressure "
                        "(duplicates are still caught by MongoDB, at a cost)",
                        "redis-cli CONFIG SET maxmemory-policy volatile-ttl")
        else:
            yield Check("redis", "eviction", "PASS", f"maxmemory-policy {policy}")
    except RedisError as exc:
        f = explain(exc, s)
        yield Check("redis", "reachable", "FAIL", f"{where}: {f.reason}",
                    "check REDIS_URL and that redis-server is running (workers degrade without it)")
        yield from _skipped("redis", ("eviction",), "needs Redis: redis reachable failed")
    finally:
        state.close()


def _provider(s: Settings) -> Check:
    try:
        vectors, ms = _timed(lambda: embed_all(make_provider(s), ["preflight check"]))
    except EmbeddingError as exc:  # a vector of another size is refused too (embeddings.usable_vector)
        return Check("provider", "one embedding", "FAIL", f"{s.embedding_provider}: {exc}",
                     "check OPENAI_API_KEY, OPENAI_BASE_URL, EMBEDDING_DIMENSIONS (the model's vector size) and the "
                     "provider's status page")
    return Check("provider", "one embedding", "PASS", f"{s.model}: {vectors.shape[-1]} dimensions in {ms:.0f} ms")


# ---- security -------------------------------------------------------------------------------------

def _security(s: Settings, env_file: str | None) -> Iterator[Check]:
    prod = s.app_env == "prod"
    if os.geteuid() == 0:
        yield Check("security", "user", "FAIL" if prod else "WARN", "running as root",
                    "run as a service user: useradd --system myshop (the systemd unit sets User=myshop)")
    else:
        yield Check("security", "user", "PASS", f"uid {os.geteuid()}")
    if env_file and Path(env_file).is_file():
        yield _settings_file_mode(Path(env_file))
    plain = [var for var, url, tls in (
        ("RABBITMQ_DSN", s.rabbitmq_dsn, "amqps"),
        ("MONGODB_URL", s.mongodb_url, None),
        ("REDIS_URL", s.redis_url, "rediss"),
    ) if not _uses_tls(url, tls)]
    if plain:
        yield Check("security", "tls", "FAIL" if prod else "WARN", "no TLS to a remote host: " + ", ".join(plain),
                    "use amqps://, rediss:// and tls=true (or mongodb+srv://) in those URLs")
    else:
        yield Check("security", "tls", "PASS", "TLS everywhere it leaves the host")
    unverified = [var for var, url in (("RABBITMQ_DSN", s.rabbitmq_dsn), ("MONGODB_URL", s.mongodb_url),
                                       ("REDIS_URL", s.redis_url)) if _UNVERIFIED_TLS.search(url)]
    if unverified:
        yield Check("security", "tls verification", "FAIL" if prod else "WARN",
                    "TLS without certificate or host verification (anyone on the path can read and change the "
                    "traffic): " + ", ".join(unverified),
                    "remove tlsInsecure / tlsAllowInvalidCertificates / tlsAllowInvalidHostnames / ssl_cert_reqs=none")


def _settings_file_mode(path: Path) -> Check:
    """The settings file holds the secrets. The checklist's `0640 root:myshop` passes: root owns it, the service
    user reads it through its group. Writable by group or others FAIL (whoever writes it chooses the settings and
    where the API key goes); readable by every user WARN. The fixes only remove rights, never the owner's or the
    group's read: the service user keeps reading its settings."""
    st = path.stat()
    mode, owner, group = stat.S_IMODE(st.st_mode), _name(pwd.getpwuid, st.st_uid), _name(grp.getgrgid, st.st_gid)
    who = f"{path} ({mode:04o} {owner}:{group})"
    if mode & (stat.S_IWOTH | stat.S_IWGRP):
        writers = "every user" if mode & stat.S_IWOTH else f"group {group}"
        return Check("security", ".env", "FAIL", f"{who} is writable by {writers}: whoever writes it chooses the "
                     "settings (and where the API key goes)", f"chmod g-w,o-rwx {path}")
    if mode & stat.S_IROTH:
        return Check("security", ".env", "WARN", f"{who} is readable by every user (it holds the secrets)",
                     f"chmod o-rwx {path}")
    readers = f"{owner} and group {group}" if mode & stat.S_IRGRP else owner
    return Check("security", ".env", "PASS", f"{who}: readable by {readers} only, writable by {owner} only")


def _name(lookup: Callable[[int], object], number: int) -> str:
    try:
        return lookup(number)[0]
    except KeyError:
        return str(number)


_UNVERIFIED_TLS = re.compile(r"[?&;](?:tlsInsecure|tlsAllowInvalidCertificates|tlsAllowInvalidHostnames|"
                             r"tlsDisableOCSPEndpointCheck)=(?:true|1)|[?&;]ssl_cert_reqs=(?:none|cert_none)"
                             r"|cert_reqs['\"]?\s*[:=]\s*['\"]?(?:0|cert_none)", re.IGNORECASE)


def _uses_tls(url: str, scheme: str | None) -> bool:
    """True when every URL uses TLS or stays on the loopback interface."""
    for one in url.split(","):
        p = urlsplit(one.strip())
        if p.hostname in _LOOPBACK or p.scheme == "unix":
            continue
        if scheme is not None and p.scheme != scheme:
            return False
        if scheme is None and p.scheme != "mongodb+srv" and not re.search(r"[?&](tls|ssl)=true", one, re.I):
            return False
    return True
