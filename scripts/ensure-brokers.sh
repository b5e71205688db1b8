#!/usr/bin/env bash
# Makes sure RabbitMQ (5672) and Redis (6379) answer on 127.0.0.1, starting
# them (and installing their Debian packages) when they do not, and that
# the programs the tests start themselves are installed even when the
# brokers answer from elsewhere (a container, another machine's port
# forward): private RabbitMQ nodes (chaos, cluster, TLS), a private Redis
# per run (scripts/test.sh) and per TLS test, etcd (scripts/etcd.sh),
# openssl (scripts/tls-ca.sh).
set -euo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_pkg() {
  echo "ensure-brokers: installing $1" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}

wait_for() { # port what seconds [check command...]
  local port=$1 what=$2 secs=$3; shift 3
  for _ in $(seq 1 "$secs"); do
    if listening "$port" && { [ $# -eq 0 ] || "$@" >/dev/null 2>&1; }; then return 0; fi
    sleep 1
  done
  echo "ensure-brokers: $what did not come up on 127.0.0.1:$port within ${secs}s" >&2
  return 1
}

if ! listening 5672; then
  command -v rabbitmq-server >/dev/null || install_pkg rabbitmq-server
  echo "ensure-brokers: starting RabbitMQ" >&2
  # A node left with its application stopped (an interrupted
  # `rabbitmqctl stop_app`, as the chaos tests do) only needs start_app.
  as_root rabbitmqctl -q start_app >/dev/null 2>&1 ||
    as_root rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_for 5672 RabbitMQ 120 as_root rabbitmqctl -q await_startup
fi

if ! listening 6379; then
  command -v redis-server >/dev/null || install_pkg redis-server
  echo "ensure-brokers: starting Redis" >&2
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  wait_for 6379 Redis 30
fi

# Installed, never started here: the tests start their own.
need() { command -v "$1" >/dev/null || install_pkg "$2"; }
need rabbitmq-server rabbitmq-server
need redis-server redis-server
need redis-cli redis-tools
need etcd etcd-server
need openssl openssl
