#!/usr/bin/env bash
# A throwaway 3-node RabbitMQ cluster on this machine, for the cluster reliability suite (tests/cluster, issue 16).
#
# Nodes rabbit-t1..t3@localhost, AMQP on 127.0.0.1:5681-5683 (dist +20000, management +10000), their own Erlang
# cookie, data and logs under $RMQT_BASE. The default node rabbit@localhost (5672/15672/25672) is never touched:
# other cookie, other ports, other data. The recipe and its measured timings: ../shared/notes/rabbitmq-cluster.md.
#
#   tools/cluster.sh up                 boot 3 nodes in parallel, join t2 and t3 to t1 (~15 s, ~26 s with management)
#   tools/cluster.sh down               stop every node, remove $RMQT_BASE (also after a partial up)
#   tools/cluster.sh status             one line per node: up | down, pid
#   tools/cluster.sh kill N             kill -9 of node N (bring it back with: start N)
#   tools/cluster.sh start N            start node N, wait for its AMQP port
#   tools/cluster.sh stop N             graceful stop of node N's VM (a rolling upgrade's step)
#   tools/cluster.sh stop-app N | start-app N
#   tools/cluster.sh stop-all | start-all   every node at once (start-all: they wait for each other's tables)
#   tools/cluster.sh alarm memory|disk N on|off
#   tools/cluster.sh ctl N ARGS...      rabbitmqctl against node N (e.g. ctl 1 list_queues name leader members)
#   tools/cluster.sh queues N ARGS...   rabbitmq-queues against node N (e.g. queues 2 check_if_node_is_quorum_critical)
#   tools/cluster.sh dsn                the comma-separated RABBITMQ_DSN of the three nodes
#
# Settings: RMQT_BASE (default /tmp/myshop-rmq-cluster); RMQT_PORT (default 5680) and RMQT_NAME (default rabbit-t)
# run a second cluster beside the first (e.g. RMQT_PORT=5690 RMQT_NAME=rabbit-u RMQT_BASE=/tmp/c2); RMQT_MGMT=1
# (default) enables the management plugin on
# 15681-15683 (policies, queue members and leader for `stats`/`preflight`), RMQT_MGMT=0 leaves it out (~10 s less).
set -euo pipefail

B=${RMQT_BASE:-/tmp/myshop-rmq-cluster}
MGMT=${RMQT_MGMT:-1}
SB=/usr/lib/rabbitmq/bin   # not /usr/sbin/*: that wrapper su's to rabbitmq and reads the default node's cookie
NODES=(1 2 3)
BOOT_TIMEOUT=${RMQT_BOOT_TIMEOUT:-120}

PORT=${RMQT_PORT:-5680}     # node i listens on PORT+i (AMQP), PORT+20000+i (dist), PORT+10000+i (management)
NAME=${RMQT_NAME:-rabbit-t}  # node i is NAME<i>@localhost
amqp_port() { echo $((PORT + $1)); }
dist_port() { echo $((PORT + 20000 + $1)); }
mgmt_port() { echo $((PORT + 10000 + $1)); }
node() { echo "$NAME$1@localhost"; }
die() { echo "cluster.sh: $*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pid_of() { cat "$B/t$1/pid" 2>/dev/null || true; }
running() { local p; p=$(pid_of "$1"); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
check_node() { [[ "${1:-}" =~ ^[123]$ ]] || die "node must be 1, 2 or 3, not '${1:-}'"; }

r() {  # run a RabbitMQ script as node $1, with nothing inherited (env -i) and this cluster's own files
  local i=$1; shift
  env -i PATH=/usr/sbin:/usr/bin:/bin LC_ALL=C.UTF-8 HOME="$B" \
    RABBITMQ_CONF_ENV_FILE="$B/env.conf" RABBITMQ_NODENAME="$(node "$i")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$(amqp_port "$i")" RABBITMQ_DIST_PORT="$(dist_port "$i")" \
    RABBITMQ_CONFIG_FILE="$B/t$i/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$B/t$i/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$B/t$i/mnesia" RABBITMQ_LOG_BASE="$B/t$i/log" RABBITMQ_PID_FILE="$B/t$i/pid" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='+S 1:1 -kernel inet_dist_use_interface {127,0,0,1}' "$@"
}
ctl() { local i=$1; shift; r "$i" "$SB/rabbitmqctl" -n "$(node "$i")" "$@"; }
queues() { local i=$1; shift; r "$i" "$SB/rabbitmq-queues" -n "$(node "$i")" "$@"; }

start() {  # start node $1 in the background, return once its AMQP port accepts connections
  local i=$1 port; port=$(amqp_port "$i")
  running "$i" && port_open "$port" && return 0
  r "$i" setsid "$SB/rabbitmq-server" >> "$B/t$i/log/server.out" 2>&1 < /dev/null &
  local deadline=$((SECONDS + BOOT_TIMEOUT))
  until port_open "$port"; do
    if [ $SECONDS -ge $deadline ]; then
      tail -n 20 "$B/t$i/log/server.out" >&2 || true
      die "node t$i: AMQP port $port not open after ${BOOT_TIMEOUT}s"
    fi
    sleep 0.2
  done
  if [ "$MGMT" = 1 ] && [ -f "$B/joined" ]; then  # management answers a few hundred ms after AMQP
    until port_open "$(mgmt_port "$i")"; do [ $SECONDS -ge $deadline ] && die "node t$i: management not up"; sleep 0.2; done
  fi
}

stop_node() {  # graceful stop of node $1, waiting for its VM to exit
  local i=$1 p; p=$(pid_of "$i")
  [ -n "$p" ] || return 0
  ctl "$i" stop >/dev/null 2>&1 || true
  local deadline=$((SECONDS + 60))
  while kill -0 "$p" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then kill -9 "$p" 2>/dev/null || true; fi
    sleep 0.1
  done
}

up() {
  [ -e "$B" ] && die "$B exists (a cluster is up, or a run was not torn down): tools/cluster.sh down first"
  for i in "${NODES[@]}"; do
    for p in "$(amqp_port "$i")" "$(dist_port "$i")" "$(mgmt_port "$i")"; do
      port_open "$p" && die "port $p is taken: refusing to start (is another cluster running?)"
    done
  done
  mkdir -p "$B"; : > "$B/env.conf"
  (umask 077; head -c 24 /dev/urandom | base64 | tr -dc A-Za-z0-9 > "$B/.erlang.cookie"); chmod 400 "$B/.erlang.cookie"
  for i in "${NODES[@]}"; do
    mkdir -p "$B/t$i/mnesia" "$B/t$i/log"
    {
      echo "listeners.tcp.1 = 127.0.0.1:$(amqp_port "$i")"
      if [ "$MGMT" = 1 ]; then
        echo "management.tcp.port = $(mgmt_port "$i")"
        echo "management.tcp.ip = 127.0.0.1"
      fi
    } > "$B/t$i/rabbitmq.conf"
    if [ "$MGMT" = 1 ]; then echo '[rabbitmq_management].' > "$B/t$i/enabled_plugins"
    else echo '[].' > "$B/t$i/enabled_plugins"; fi
  done
  local pids=()
  for i in "${NODES[@]}"; do start "$i" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || die "a node did not boot (logs under $B/t*/log)"; done
  for i in 2 3; do
    ctl "$i" stop_app >/dev/null
    ctl "$i" join_cluster "$(node 1)" >/dev/null
    ctl "$i" start_app >/dev/null
  done
  touch "$B/joined"
  if [ "$MGMT" = 1 ]; then
    for i in "${NODES[@]}"; do
      local deadline=$((SECONDS + 60))
      until port_open "$(mgmt_port "$i")"; do [ $SECONDS -ge $deadline ] && die "management of t$i not up"; sleep 0.2; done
    done
  fi
  ctl 1 await_online_nodes 3 --timeout 60 >/dev/null
}

down() {
  [ -e "$B" ] || return 0
  for i in "${NODES[@]}"; do stop_node "$i" & done
  wait
  rm -rf "$B"
}

alarm() {
  local kind=${1:-} i=${2:-} state=${3:-}
  check_node "$i"
  case "$kind/$state" in
    memory/on) ctl "$i" set_vm_memory_high_watermark 0.0001 >/dev/null ;;
    memory/off) ctl "$i" set_vm_memory_high_watermark 0.4 >/dev/null ;;
    disk/on) ctl "$i" set_disk_free_limit 100000GB >/dev/null ;;
    disk/off) ctl "$i" set_disk_free_limit 50MB >/dev/null ;;
    *) die "usage: alarm memory|disk N on|off" ;;
  esac
}

cmd=${1:-}; shift || true
case "$cmd" in
  up) up ;;
  down) down ;;
  status)
    for i in "${NODES[@]}"; do
      if running "$i"; then echo "t$i up pid=$(pid_of "$i") amqp=$(amqp_port "$i")"; else echo "t$i down"; fi
    done ;;
  kill) check_node "${1:-}"; p=$(pid_of "$1"); [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true
        while [ -n "$p" ] && kill -0 "$p" 2>/dev/null; do sleep 0.05; done ;;
  start) check_node "${1:-}"; start "$1" ;;
  stop) check_node "${1:-}"; stop_node "$1" ;;
  stop-app) check_node "${1:-}"; ctl "$1" stop_app >/dev/null ;;
  start-app) check_node "${1:-}"; ctl "$1" start_app >/dev/null ;;
  stop-all) for i in "${NODES[@]}"; do stop_node "$i" & done; wait ;;
  start-all) pids=(); for i in "${NODES[@]}"; do start "$i" & pids+=($!); done
             for p in "${pids[@]}"; do wait "$p"; done ;;
  alarm) alarm "$@" ;;
  ctl) check_node "${1:-}"; i=$1; shift; ctl "$i" "$@" ;;
  queues) check_node "${1:-}"; i=$1; shift; queues "$i" "$@" ;;
  dsn) echo "amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,amqp://guest:guest@127.0.0.1:5683/%2f" ;;
  *) sed -n '2,22p' "$0" >&2; exit 2 ;;
esac
