"""supervisor/myshop-worker.conf: parsed as supervisord parses it (INI, `%(process_num)d` expansion), the
stop/restart policy the worker's exit codes need, and one metrics port per process."""

from __future__ import annotations

import configparser
import getpass
import shlex

import pytest

from tests.deploy.common import INSTALLED_MYSHOP, ROOT, assert_cli_accepts, myshop_args

CONF = ROOT / "supervisor" / "myshop-worker.conf"
WORKER = "program:myshop-worker"
EXPORTER = "program:myshop-metrics"


@pytest.fixture(scope="module")
def conf() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(" ;",), strict=True)
    parser.read_string(CONF.read_text())
    return parser


def expand(template: str, section: str, process_num: int) -> str:
    """supervisord's expansion of a program option (Python %-formatting with these names)."""
    return template % {"program_name": section.split(":", 1)[1], "process_num": process_num,
                       "group_name": section.split(":", 1)[1], "host_node_name": "host", "here": str(CONF.parent),
                       "numprocs": 3}


def worker_numbers(conf) -> list[int]:
    start = conf.getint(WORKER, "numprocs_start", fallback=0)
    return list(range(start, start + conf.getint(WORKER, "numprocs")))


def metrics_port(command: str) -> int:
    argv = shlex.split(command)
    return int(argv[argv.index("--metrics-port") + 1])


def test_three_workers_with_distinct_names_and_ports_9301_to_9303(conf):
    assert conf.getint(WORKER, "numprocs") == 3
    numbers = worker_numbers(conf)
    names = [expand(conf.get(WORKER, "process_name"), WORKER, n) for n in numbers]
    assert len(set(names)) == 3 and all("%" not in n for n in names)
    ports = [metrics_port(expand(conf.get(WORKER, "command"), WORKER, n)) for n in numbers]
    assert ports == [9301, 9302, 9303]


def test_port_scheme_holds_for_more_workers(conf):
    """Instance N on 9300+N for every process number supervisord could give up to 99 workers."""
    template = conf.get(WORKER, "command")
    for n in range(1, 100):
        assert metrics_port(expand(template, WORKER, n)) == 9300 + n


def test_worker_command_is_the_worker_with_limits(conf):
    argv = shlex.split(expand(conf.get(WORKER, "command"), WORKER, 1))
    assert argv[0] == INSTALLED_MYSHOP  # no shell in between: supervisord signals the worker itself
    args = myshop_args(argv)
    assert args[0] == "consume"
    assert args[args.index("--memory-limit") + 1] == "512M"
    assert args[args.index("--time-limit") + 1] == "3600"
    assert_cli_accepts(args)


def test_exporter_on_9300(conf):
    argv = shlex.split(conf.get(EXPORTER, "command"))
    assert argv[0] == INSTALLED_MYSHOP
    args = myshop_args(argv)
    assert args == ["stats", "--serve-metrics", "9300"]
    assert_cli_accepts(args)


@pytest.mark.parametrize("section", [WORKER, EXPORTER])
def test_stop_restart_and_logs(conf, section):
    get = conf[section].get
    assert get("stopsignal") == "TERM"
    assert get("autorestart") == "true", "planned stops exit 0 and must be restarted"
    assert get("exitcodes") == "0"
    # a configuration error (exit 2) or unreachable dependency (exit 3) exits within ~7 s of the start: it
    # must count as a failed start (FATAL after startretries), not as a run to restart forever
    assert conf.getint(section, "startsecs") >= 10
    assert 1 <= conf.getint(section, "startretries") <= 10
    assert get("user") not in (None, "root")
    assert get("directory") == "/opt/myshop-ops", "the installed checkout"
    assert conf.getboolean(section, "redirect_stderr")
    assert get("stdout_logfile", "").startswith("/var/log/myshop/")
    assert get("stdout_logfile_maxbytes") and conf.getint(section, "stdout_logfile_backups") >= 1
    assert conf.getboolean(section, "killasgroup")
    assert not conf.getboolean(section, "stopasgroup", fallback=False), "SIGTERM to the worker only"


def test_worker_gets_time_to_finish_its_batch(conf):
    assert conf.getint(WORKER, "stopwaitsecs") >= 150
    assert conf.getint(WORKER, "numprocs_start") == 1


def test_supervisord_itself_reads_the_file(tmp_path):
    """supervisord's own parser (when the supervisor package is installed): process names, expanded commands,
    signals. The user and log directory are swapped for ones that exist here (supervisord checks both)."""
    options = pytest.importorskip("supervisor.options", reason="supervisor not installed (pip install supervisor)")
    text = CONF.read_text().replace("user=myshop", f"user={getpass.getuser()}")
    text = text.replace("/var/log/myshop", str(tmp_path))
    (tmp_path / "programs.conf").write_text(text)
    main = tmp_path / "supervisord.conf"
    main.write_text(f"[supervisord]\nlogfile={tmp_path}/supervisord.log\n[include]\nfiles = {tmp_path}/programs.conf\n")
    opts = options.ServerOptions()
    opts.configfile = str(main)
    opts.process_config(do_usage=False)
    procs = {p.name: p for g in opts.process_group_configs for p in g.process_configs}
    assert sorted(procs) == ["myshop-metrics", "myshop-worker_01", "myshop-worker_02", "myshop-worker_03"]
    assert [metrics_port(procs[f"myshop-worker_0{n}"].command) for n in (1, 2, 3)] == [9301, 9302, 9303]
    assert all(p.stopwaitsecs >= 30 and p.killasgroup for p in procs.values())
    assert procs["myshop-worker_01"].stopwaitsecs == 150
