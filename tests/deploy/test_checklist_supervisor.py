"""CHECKLIST.md's supervisor path, performed as written: the blocks marked `<!-- checklist-test: NAME -->` are read
from CHECKLIST.md and run line by line in a root shell, with the host paths moved into a temporary root (/opt,
/etc/myshop, /etc/supervisor, /var/log/myshop, /tmp) and the metrics ports moved off 93NN. A real system user
`myshop` (created when absent, removed afterwards), the settings file with the documented owner and mode, a real
supervisord from the shipped program file, RabbitMQ, Redis and the Mongo-wire server. Every `myshop` command runs
as the service user through the checklist's own `myshop()` function (runuser).

Lines the test cannot run as they are (the package manager, unpacking a release tarball) are replaced by named
equivalents; a line the test does not recognise is run as it is, and a replacement whose pattern no longer appears
fails the test: the docs and this test cannot drift apart silently. systemd lines (systemctl, journalctl) are
skipped: the systemd path is checked by tests/deploy/test_systemd.py (systemd-analyze).

In `make test` the idempotency, recommendations and rollback steps are left to `make soak` (SOAK=1) or
CHECKLIST_FULL=1 (the whole path takes ~115 s on 2 cores, mostly supervisorctl start waiting startsecs and verify).

The venv is made as written (`/usr/bin/python3 -m venv`); building the release (`make release`'s `python -m build`)
and its `pip install` take ~40 s, so by default the venv gets this checkout's packages through a .pth file instead;
with SOAK=1 (`make soak`) the wheel is built into the temporary root's dist/ and the pip line runs as written."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.checklist import mismatch, quoted_outputs
from tests.support.services import DIMS, ROOT, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.timeout(420)]

CHECKLIST = ROOT / "CHECKLIST.md"
SOAK = os.environ.get("SOAK") == "1"
FULL = SOAK or os.environ.get("CHECKLIST_FULL") == "1"  # idempotency, recommendations, rollback too
USER = "myshop"
PORT_PREFIX = "194"  # process N on 194NN (19401, ...), the exporter on 19400: away from a real deployment's 93NN
BIN = Path(sys.executable).parent
_MARK = re.compile(r"^\s*<!-- checklist-test: (\S+) -->\s*$")
_PATHS = re.compile(r"(?<![\w.-])(/opt/myshop-ops|/etc/myshop|/etc/supervisor|/var/log/myshop|/tmp/)")
_SYSTEMD = re.compile(r"^\s*(systemctl|journalctl|systemd-analyze)\b")

pytestmark.append(pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None or not Path(
    "/usr/bin/python3").exists(), reason="needs root (a system user), runuser and a system /usr/bin/python3"))


# ------------------------------------------------------------------------------------------ reading the docs

def marked_steps(text: str) -> dict[str, list[str]]:
    """NAME -> the lines of the fenced block after its marker, or the inline `myshop ...` spans of the paragraph
    after it."""
    lines, steps = text.splitlines(), {}
    for i, line in enumerate(lines):
        m = _MARK.match(line)
        if not m:
            continue
        rest = lines[i + 1:]
        if rest and rest[0].strip().startswith("```"):
            end = next(j for j in range(1, len(rest)) if rest[j].strip().startswith("```"))
            steps[m.group(1)] = [x.strip() for x in rest[1:end] if x.strip()]
        else:
            paragraph = []
            for x in rest:
                if not x.strip() or (paragraph and re.match(r"\s*(- |\d+\. )", x)):
                    break
                paragraph.append(x)
            steps[m.group(1)] = [c for c in re.findall(r"`([^`\n]+)`", " ".join(paragraph)) if c.startswith("myshop ")]
    return steps


def predeployment_commands(text: str) -> list[str]:
    """Section 1's numbered `myshop` steps, in order (setup-transports, setup-indexes, products import,
    preflight)."""
    section = text.split("## 1. Pre-deployment", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\d+\. `(myshop [^`]+)`", section, re.MULTILINE)


def output_name(line: str) -> str:
    """The name a command's quoted output has in CHECKLIST.md: its command words (`products-import`)."""
    words = [w for w in line.split()[1:] if not w.startswith("-") and "/" not in w and "." not in w]
    return "-".join(words)


def as_documented(output: str, env) -> str:
    """The test deployment's output in the checklist's names: its queues, database, vector size and retries are
    the documented deployment's (user_embedding_updates, failed, myshop, 1536, 5)."""
    for ours, documented in ((env["RABBITMQ_QUEUE"], "user_embedding_updates"),
                             (env["RABBITMQ_FAILED_QUEUE"], "failed"), (env["MONGODB_DB"], "myshop")):
        output = re.sub(rf"(?<![\w.-]){re.escape(ours)}(?![\w-])", documented, output)
    output = output.replace(f"{DIMS}d)", "1536d)").replace(f": {DIMS} dimensions", ": 1536 dimensions")
    return output.replace(f" {env['WORKER_MAX_RETRIES']} retry queues,", " 5 retry queues,")


def assert_prints_as_quoted(name: str, done: subprocess.CompletedProcess, env, compared: set[str]) -> None:
    quoted, excerpt = quoted_outputs(CHECKLIST.read_text())[name]
    why = mismatch(quoted, excerpt, as_documented(done.stdout, env))
    assert why is None, f"CHECKLIST.md's output of {name} is not what it prints: {why}\n{done.stdout}"
    compared.add(name)


def test_the_checklist_marks_every_step_of_the_supervisor_path():
    steps = marked_steps(CHECKLIST.read_text())
    assert {"install", "settings", "supervisor", "smoke", "idempotency", "recommendations", "rollback",
            "scaling"} <= set(steps)
    assert all(steps.values()), {k: v for k, v in steps.items() if not v}
    assert [c.split()[1] for c in predeployment_commands(CHECKLIST.read_text())] == [
        "setup-transports", "setup-indexes", "products", "preflight"]


# ---------------------------------------------------------------------------------------------- the host

class Host:
    """The temporary root, the shell that runs the checklist's lines, and supervisord."""

    def __init__(self, root: Path):
        self.root = root
        self.prelude = ""  # the checklist's myshop() function, localized
        self.cwd = root
        self.conf = root / "etc/supervisor/supervisord.conf"
        self.env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                    "LANG": "C.UTF-8", "MYSHOP_ENV_FILE": str(root / "etc/myshop/myshop.env"), "COLUMNS": "160"}
        self.log: list[str] = []

    def localize(self, line: str) -> str:
        line = _PATHS.sub(lambda m: str(self.root) + m.group(1), line)
        line = re.sub(r"(?<![\w/.-])supervisorctl ", f"{BIN}/supervisorctl -c {self.conf} ", line)
        line = re.sub(r"(?<![\w/.-])supervisord -c ", f"{BIN}/supervisord -c ", line)
        return re.sub(r"localhost:93(\d\d)\b", rf"localhost:{PORT_PREFIX}\1", line)

    def sh(self, line: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        script = f"{self.prelude}\n{self.localize(line)}"
        done = subprocess.run(["bash", "-c", script], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        self.log.append(f"$ {line}\n{done.stdout}{done.stderr}[exit {done.returncode}]")
        if os.environ.get("CHECKLIST_TIMES"):
            print(f"{time.monotonic():.1f} {line[:70]}", flush=True)
        if check:
            assert done.returncode == 0, f"`{line}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([f"{BIN}/supervisorctl", "-c", str(self.conf), *args], capture_output=True,
                              text=True, timeout=60)

    def status(self) -> dict[str, tuple[str, int | None]]:
        out = {}
        for line in self.ctl("status").stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                pid = re.search(r"pid (\d+)", line)
                out[parts[0]] = (parts[1], int(pid.group(1)) if pid else None)
        return out

    def workers(self) -> dict[str, tuple[str, int | None]]:
        return {k: v for k, v in self.status().items() if k.startswith("myshop-worker:")}


def management(path: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:15672/api/{path}")
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def consumers(queue: str) -> int:
    from myshop_ops.adapters import broker

    conn = broker.connect("amqp://guest:guest@127.0.0.1:5672/%2f", name="test-checklist")
    try:
        return conn.channel().queue_declare(queue, passive=True).method.consumer_count
    finally:
        conn.close()


def drained(prefix: str) -> bool:
    """Every queue of the test's topology (main, retries, failed) with nothing ready or unacked (the management
    API's view; asked twice a few hundred ms apart so a sample between two refreshes is not taken for empty)."""
    def empty():
        queues = [q for q in management("queues/%2f") if q["name"].startswith(prefix)]
        return queues and all(q.get("messages", 0) == 0 for q in queues)
    if not empty():
        return False
    time.sleep(0.5)  # not a wait for a condition: the second sample of the same condition
    return empty()


def preflight_checks(host: Host, line: str) -> dict[tuple[str, str], dict]:
    done = host.sh(f"{line} --json", check=False)
    assert done.returncode == 0, f"{line}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return {(c["section"], c["name"]): c for c in json.loads(done.stdout)["checks"]}


def not_pass(checks: dict) -> dict:
    return {k: (c["status"], c["detail"]) for k, c in checks.items() if c["status"] not in ("PASS", "SKIP")}


# ------------------------------------------------------------------------------------------------ the path

@pytest.fixture
def host() -> Host:
    root = Path(tempfile.mkdtemp(prefix="myshop-checklist-", dir="/var/tmp"))  # not under /tmp: moved itself
    root.chmod(0o755)  # the service user walks into it (pytest's tmp_path is 0700)
    for d in ("opt", "etc/supervisor/conf.d", "var/log", "run"):
        (root / d).mkdir(parents=True)
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)
    h = Host(root)
    created = False
    try:
        pwd.getpwnam(USER)
    except KeyError:
        created = True
    h.created_user = created
    yield h
    pid_file = root / "run/supervisord.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)  # supervisord stops its programs (TERM, each finishes its batch), then exits
            wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=180, what="supervisord to exit")
    if created:
        subprocess.run(["userdel", USER], capture_output=True, timeout=30)
    shutil.rmtree(root, ignore_errors=True)


def supervisord_conf(root: Path) -> str:
    """Debian's /etc/supervisor/supervisord.conf, in the temporary root."""
    return f"""[unix_http_server]
file={root}/run/supervisor.sock
chmod=0700

[supervisord]
logfile={root}/var/log/supervisord.log
pidfile={root}/run/supervisord.pid
childlogdir={root}/var/log

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{root}/run/supervisor.sock

[include]
files = {root}/etc/supervisor/conf.d/*.conf
"""


def build_wheel(host: Host) -> str:
    """`make release`'s wheel of this checkout in the temporary root's dist/; its version."""
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(host.root / "dist"), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next((host.root / "dist").glob("myshop_ops-*-py3-none-any.whl"))
    host.version = wheel.name.removeprefix("myshop_ops-").removesuffix("-py3-none-any.whl")
    return host.version


def install(host: Host, lines: list[str]) -> None:
    seen = set()
    for line in lines:
        if line.startswith("apt-get install"):
            seen.add("apt")
            assert "supervisor" in line and (BIN / "supervisord").exists()  # the test dependency stands in
        elif line.startswith("useradd"):
            seen.add("useradd")
            if host.created_user:
                host.sh(line)
        elif "tar -xzf" in line:  # the release tarball: this checkout's files
            seen.add("tar")
            target = host.root / "opt/myshop-ops"
            target.mkdir()
            for name in ("myshop_ops", "supervisor", "systemd", "monitoring", "examples"):
                shutil.copytree(ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
            for name in ("pyproject.toml", "README.md", "CHECKLIST.md", ".env.example"):
                shutil.copy2(ROOT / name, target / name)
        elif " -m venv " in line:
            seen.add("venv")
            make, pip = (part.strip() for part in line.split("&&"))
            assert make.startswith("/usr/bin/python3 -m venv") and "/bin/pip install" in pip
            host.sh(make)
            if SOAK:
                host.sh(pip.replace("VERSION", build_wheel(host)), timeout=600)
            else:  # this checkout's packages (readable by every user) instead of a 30 s pip install
                venv = host.root / "opt/myshop-ops/.venv"
                dev = next((ROOT / ".venv/lib").glob("python3*/site-packages"))
                site = next((venv / "lib").glob("python3*/site-packages"))
                # this checkout first: the dev venv's editable install may point at another worktree
                (site / "myshop_checkout.pth").write_text(f"import site, sys; site.addsitedir({str(dev)!r}); "
                                                          f"sys.path.insert(0, {str(ROOT)!r})\n")
                # what pip would add for this interpreter only: redis needs async-timeout below Python 3.11.3
                host.sh("/opt/myshop-ops/.venv/bin/pip install -q async-timeout", timeout=120)
                (venv / "bin/myshop").write_text(f"#!{venv}/bin/python\nfrom myshop_ops.cli.app import main\n"
                                                 "raise SystemExit(main())\n")
                (venv / "bin/myshop").chmod(0o755)
        elif line.startswith("cd "):
            seen.add("cd")
            host.cwd = Path(host.localize(line[3:].strip()))
        elif line.startswith("myshop()"):
            seen.add("function")
            host.prelude = host.localize(line)
        else:
            host.sh(line)
    assert "dist/myshop_ops-VERSION-py3-none-any.whl" in " ".join(lines)  # the release's wheel, not the source tree
    assert seen == {"apt", "useradd", "tar", "venv", "cd", "function"}, f"install block changed: {seen}"
    python = (host.root / "opt/myshop-ops/.venv/bin/python").resolve()
    assert not str(python).startswith("/root/"), python
    assert host.sh("runuser -u myshop -- /opt/myshop-ops/.venv/bin/python -c 'import myshop_ops'").returncode == 0


def test_the_supervisor_deployment_path_as_written(host: Host, env, fake_openai):
    started = time.monotonic()
    text = CHECKLIST.read_text()
    steps = marked_steps(text)

    # 1. install, settings
    install(host, steps["install"])
    for line in steps["settings"]:
        host.sh(line)
    settings = host.root / "etc/myshop/myshop.env"
    values = {**{k: v for k, v in env.items() if k != "MYSHOP_ALLOW_ROOT"}, "EMBEDDING_PROVIDER": "openai",
              "OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": fake_openai.base_url, "LOG_FORMAT": "json",
              "RABBITMQ_MANAGEMENT_URL": "http://guest:guest@127.0.0.1:15672"}
    with open(settings, "w") as f:  # "then edit it as root": same file, same owner and mode
        f.write("".join(f"{k}={v}\n" for k, v in values.items()))
    st = settings.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, pwd.getpwuid(st.st_uid).pw_name) == (0o640, 0, "root")
    assert st.st_gid == pwd.getpwnam(USER).pw_gid

    # section 1, steps 3-6: topology, indexes, catalog, preflight
    *prepare, preflight = predeployment_commands(text)
    compared: set[str] = set()  # the quoted outputs compared with what the commands print
    for line in prepare:
        done = host.sh(line)
        if output_name(line) in quoted_outputs(text):
            assert_prints_as_quoted(output_name(line), done, env, compared)
    assert_prints_as_quoted("preflight", host.sh(preflight), env, compared)
    checks = preflight_checks(host, preflight)
    assert checks[("security", ".env")]["status"] == "PASS", checks[("security", ".env")]
    assert checks[("security", "user")]["status"] == "PASS"
    # the only non-PASS the checklist announces: no consumer before the workers start
    assert not_pass(checks).keys() <= {("rabbitmq", "consumers")}, not_pass(checks)

    # section 2: supervisor
    host.conf.write_text(supervisord_conf(host.root))
    queue = env["RABBITMQ_QUEUE"]
    for line in steps["supervisor"]:
        done = host.sh(line)
        if line.startswith("cp ") and "myshop-worker.conf" in line:
            installed = host.root / "etc/supervisor/conf.d/myshop-worker.conf"
            conf = host.localize(installed.read_text())
            conf = conf.replace("93%(process_num)02d", f"{PORT_PREFIX}%(process_num)02d")
            conf = conf.replace("--serve-metrics 9300", f"--serve-metrics {PORT_PREFIX}00")
            assert conf.count('environment=PYTHONUNBUFFERED="1"') == 2
            conf = conf.replace('environment=PYTHONUNBUFFERED="1"',  # /etc/myshop/myshop.env moved: the conf's way
                                f'environment=PYTHONUNBUFFERED="1",MYSHOP_ENV_FILE="{settings}"')
            installed.write_text(conf)
        if "reread" in line:
            assert "added process group" in done.stdout, done.stdout
    wait_for(lambda: consumers(queue) == 3, timeout=60, what="3 workers consuming")
    # section 3 under supervisor (RUNNING after startsecs=15: checked after the smoke run, which overlaps it)
    assert any(json.loads(x).get("msg") == "consuming" for x in (host.root / "var/log/myshop/myshop-worker_01.log")
               .read_text().splitlines() if x.startswith("{"))
    ready = json.loads(host.sh("curl -s localhost:9301/readyz").stdout)
    assert ready["ok"] and ready["consumer_attached"]
    checks = preflight_checks(host, preflight)
    assert checks[("rabbitmq", "consumers")]["status"] == "PASS" and not not_pass(checks), not_pass(checks)

    # section 5: smoke, idempotency with a SIGKILL, recommendations
    for line in steps["smoke"]:
        host.sh(line)
    wait_for(lambda: [s for s, _ in host.status().values()] == ["RUNNING"] * 4, timeout=60,
             what=f"4 processes RUNNING: {host.status()}")
    assert sorted(host.workers()) == [f"myshop-worker:myshop-worker_0{n}" for n in (1, 2, 3)]
    assert_prints_as_quoted("stats", host.sh("myshop stats"), env, compared)  # section 3, three workers
    # every output the checklist quotes, but the configuration error (tests/docs/test_checklist.py)
    assert compared == set(quoted_outputs(text)) - {"configuration-error"}
    # idempotency with a SIGKILL, recommendations and rollback add ~40 s: make soak (SOAK=1) or CHECKLIST_FULL=1
    if FULL:
        for line in steps["idempotency"]:
            if _SYSTEMD.match(line):
                continue
            if "signal KILL" in line:
                before = host.workers()["myshop-worker:myshop-worker_01"][1]
                host.sh(line)
                wait_for(lambda b=before: host.workers()["myshop-worker:myshop-worker_01"][1] not in (None, b),
                         timeout=30, what="supervisord to restart the killed worker")
                continue
            if line.startswith("myshop verify"):
                wait_for(lambda: drained(env["RABBITMQ_QUEUE"].rsplit(".", 1)[0]), timeout=120,
                         what="the idempotency run to drain")
            host.sh(line)
        for line in steps["recommendations"]:
            host.sh(line)

        # section 6: rollback
        for line in steps["rollback"]:
            if "tar -xzf" in line:  # the previous release: this one again (SOAK: its pip install as written)
                if SOAK:
                    host.sh(line.split("&&", 1)[1].strip().replace("PREVIOUS", host.version), timeout=600)
                continue
            if line.startswith("myshop preflight"):
                checks = preflight_checks(host, line)
                assert not_pass(checks).keys() <= {("rabbitmq", "consumers")}, not_pass(checks)
                continue
            if "restart myshop-metrics" in line:
                before = host.status()["myshop-metrics"][1]
            host.sh(line)
            if "restart myshop-metrics" in line:
                assert host.status()["myshop-metrics"][1] not in (None, before), "the exporter restarted"
            if "stop 'myshop-worker:*'" in line:
                assert {s for s, _ in host.workers().values()} == {"STOPPED"}
                assert host.status()["myshop-metrics"][0] == "RUNNING"
                assert consumers(queue) == 0
        wait_for(lambda: consumers(queue) == 3, timeout=60, what="3 workers again after the rollback")

    # section 7: numprocs 3 -> 4 restarts the whole group
    pids = {name: pid for name, (_, pid) in host.workers().items()}
    for line in steps["scaling"]:
        host.sh(line)
    wait_for(lambda: consumers(queue) == 4, timeout=90, what="4 workers after numprocs=4")
    after = host.workers()
    assert sorted(after) == [f"myshop-worker:myshop-worker_0{n}" for n in (1, 2, 3, 4)]
    assert all(after[name][1] != pid for name, pid in pids.items()), "update restarts the whole group"
    ready = json.loads(host.sh("curl -s localhost:9304/readyz").stdout)
    assert ready["ok"]
    print(f"checklist supervisor path: {time.monotonic() - started:.0f} s")
