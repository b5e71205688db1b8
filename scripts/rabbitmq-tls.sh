#!/usr/bin/env bash
# A private RabbitMQ node that speaks only TLS, for the `amqps://` tests:
#
#   scripts/rabbitmq-tls.sh up DIR AMQPS_PORT DIST_PORT   start it (waits until it serves)
#   scripts/rabbitmq-tls.sh down DIR                      stop it and remove DIR's node data
#
# DIR holds everything: a throwaway CA and the node's certificate
# (scripts/tls-ca.sh, in DIR/tls; clients trust DIR/tls/ca.pem), its
# config, data, logs and Erlang cookie. The node is
# commissaire-tls-AMQPS_PORT@localhost, listening on 127.0.0.1:AMQPS_PORT
# (amqps only, no plain listener) with Erlang distribution on DIST_PORT.
# The machine's own RabbitMQ is left alone. As scripts/rabbitmq-cluster.sh,
# it runs the scripts under /usr/lib/rabbitmq/bin directly.
set -euo pipefail

BIN=/usr/lib/rabbitmq/bin
cd "$(dirname "$0")/.."
root=$PWD

node_env() {
  local dir=$1 port=$2 dist=$3
  export HOME="$dir"
  export ERL_CRASH_DUMP=/dev/null
  export RABBITMQ_NODENAME="commissaire-tls-$port@localhost"
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_DIST_PORT=$dist
  export RABBITMQ_MNESIA_BASE="$dir/mnesia"
  export RABBITMQ_LOG_BASE="$dir/log"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
  export RABBITMQ_CONFIG_FILE="$dir/rabbitmq"
  export RABBITMQ_PID_FILE="$dir/pid"
}

ctl() {
  local dir=$1 port=$2 dist=$3
  shift 3
  (node_env "$dir" "$port" "$dist" && "$BIN/rabbitmqctl" -n "commissaire-tls-$port@localhost" "$@")
}

up() {
  local dir=$1 port=$2 dist=$3
  [ -x "$BIN/rabbitmq-server" ] || scripts/ensure-brokers.sh
  mkdir -p "$dir/mnesia" "$dir/log"
  dir=$(cd "$dir" && pwd)
  "$root/scripts/tls-ca.sh" "$dir/tls"
  if [ ! -f "$dir/.erlang.cookie" ]; then
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/.erlang.cookie"
    chmod 400 "$dir/.erlang.cookie"
  fi
  echo "[]." >"$dir/enabled_plugins"
  cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp = none
listeners.ssl.1 = 127.0.0.1:$port
ssl_options.cacertfile = $dir/tls/ca.pem
ssl_options.certfile = $dir/tls/server.pem
ssl_options.keyfile = $dir/tls/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
loopback_users = none
CONF
  echo "$port $dist" >"$dir/ports"
  (node_env "$dir" "$port" "$dist" && "$BIN/rabbitmq-server" -detached)
  local deadline=$((SECONDS + 120))
  until ctl "$dir" "$port" "$dist" -q await_startup --timeout 30 >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "node commissaire-tls-$port did not start within 120 s; its log:" >&2
      tail -n 40 "$dir/log/"*.log >&2 2>/dev/null || echo "(no log in $dir/log)" >&2
      return 1
    fi
    sleep 1
  done
  echo "amqps on 127.0.0.1:$port; trust $dir/tls/ca.pem"
}

down() {
  local dir=$1 port dist
  [ -f "$dir/ports" ] || return 0
  read -r port dist <"$dir/ports"
  ctl "$dir" "$port" "$dist" -q stop >/dev/null 2>&1 || true
  rm -rf "$dir/mnesia" "$dir/log" "$dir/ports"
}

case "${1:-}" in
  up) up "${2:?DIR}" "${3:?AMQPS_PORT}" "${4:?DIST_PORT}" ;;
  down) down "${2:?DIR}" ;;
  *) echo "usage: $0 up DIR AMQPS_PORT DIST_PORT | down DIR" >&2; exit 2 ;;
esac
