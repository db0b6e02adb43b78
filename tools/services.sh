#!/usr/bin/env bash
# Start what is not running: RabbitMQ, Redis and the Mongo-wire server (127.0.0.1:27017). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .run

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 1 "${2:-60}"); do port_open "$1" && return 0; sleep 1; done; echo "port $1 did not open" >&2; return 1; }

if ! port_open 5672; then
  echo "starting RabbitMQ"; rabbitmq-server -detached; wait_port 5672 90
fi
if ! port_open 15672; then  # the management API: `stats` rates and unacked counts, `preflight` topology checks
  echo "enabling the RabbitMQ management plugin"; rabbitmq-plugins enable rabbitmq_management >/dev/null
  wait_port 15672 60
fi
if ! port_open 6379; then
  echo "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp \
    --logfile "$PWD/.run/redis.log"
  wait_port 6379 30
fi
if ! port_open 27017; then
  echo "starting the Mongo-wire server (mongoeco, memory engine)"
  nohup .venv-mongo/bin/python tools/mongo_wire_server.py --port 27017 > .run/mongo-wire.log 2>&1 &
  echo $! > .run/mongo-wire.pid
  wait_port 27017 60
fi
echo "RabbitMQ   amqp://guest:***@127.0.0.1:5672/%2f"
echo "Management http://guest:***@127.0.0.1:15672"
echo "Redis      redis://127.0.0.1:6379/0"
echo "MongoDB    mongodb://127.0.0.1:27017/?directConnection=true  (mongoeco wire server, data in memory)"
