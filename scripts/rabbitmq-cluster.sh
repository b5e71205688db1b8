#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on this machine, for the cluster tests:
#
#   scripts/rabbitmq-cluster.sh up      start and join the nodes (idempotent)
#   scripts/rabbitmq-cluster.sh down    stop them and remove their data
#   scripts/rabbitmq-cluster.sh status  whether all three are clustered
#   scripts/rabbitmq-cluster.sh ctl N ARGS...   rabbitmqctl on node N
#   scripts/rabbitmq-cluster.sh leader QUEUE    the node number leading a
#                                               quorum queue
#
# Nodes commissaire-c1@localhost, -c2, -c3 with AMQP on 127.0.0.1:5681,
# 5682 and 5683, distribution ports 25681-25683, their own data and logs
# and Erlang cookie under $COMMISSAIRE_CLUSTER_DIR (default
# /tmp/commissaire-rabbitmq-cluster). The machine's own RabbitMQ (5672) is
# left alone. RabbitMQ comes from Debian's packages (scripts/ensure-brokers.sh
# installs them); the Debian wrapper switches to the rabbitmq user, so the
# nodes are started with the scripts under /usr/lib/rabbitmq/bin, as root.
set -euo pipefail

BASE=${COMMISSAIRE_CLUSTER_DIR:-/tmp/commissaire-rabbitmq-cluster}
BIN=/usr/lib/rabbitmq/bin
NODES=(1 2 3)

node_env() {
  local n=$1
  export HOME="$BASE"
  # rabbitmqctl against a stopped node would leave erl_crash.dump here.
  export ERL_CRASH_DUMP=/dev/null
  export RABBITMQ_NODENAME="commissaire-c$n@localhost"
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$((5680 + n))
  export RABBITMQ_DIST_PORT=$((25680 + n))
  export RABBITMQ_MNESIA_BASE="$BASE/c$n/mnesia"
  export RABBITMQ_LOG_BASE="$BASE/c$n/log"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$BASE/enabled_plugins"
  export RABBITMQ_CONFIG_FILE="$BASE/c$n/rabbitmq"
  export RABBITMQ_PID_FILE="$BASE/c$n/pid"
}

ctl() {
  local n=$1
  shift
  (node_env "$n" && "$BIN/rabbitmqctl" -n "commissaire-c$n@localhost" "$@")
}

running() {
  ctl "$1" -q status >/dev/null 2>&1
}

# A node started with -detached registers with epmd only some seconds
# later, and await_startup fails at once on a node it cannot find: poll
# until the node boots, and show its log when it never does.
await_node() {
  local n=$1 deadline=$((SECONDS + 120))
  until ctl "$n" -q await_startup --timeout 30 >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "node commissaire-c$n did not start within 120 s; its log:" >&2
      tail -n 40 "$BASE/c$n/log/"*.log >&2 2>/dev/null || echo "(no log in $BASE/c$n/log)" >&2
      return 1
    fi
    sleep 1
  done
}

up() {
  [ -x "$BIN/rabbitmq-server" ] || scripts/ensure-brokers.sh
  mkdir -p "$BASE"
  if [ ! -f "$BASE/.erlang.cookie" ]; then
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$BASE/.erlang.cookie"
    chmod 400 "$BASE/.erlang.cookie"
  fi
  echo "[]." >"$BASE/enabled_plugins"
  for n in "${NODES[@]}"; do
    mkdir -p "$BASE/c$n/mnesia" "$BASE/c$n/log"
    # Quorum queues need no plugin; the default guest user may connect
    # from 127.0.0.1 only, which is where the tests are.
    printf 'listeners.tcp.default = 127.0.0.1:%s\nloopback_users = none\n' $((5680 + n)) >"$BASE/c$n/rabbitmq.conf"
    if running "$n"; then
      continue
    fi
    (node_env "$n" && "$BIN/rabbitmq-server" -detached)
  done
  for n in "${NODES[@]}"; do
    await_node "$n"
  done
  for n in 2 3; do
    if ctl "$n" -q cluster_status --formatter json 2>/dev/null | grep -q 'commissaire-c1@localhost'; then
      continue
    fi
    ctl "$n" -q stop_app
    ctl "$n" -q join_cluster commissaire-c1@localhost
    ctl "$n" -q start_app
  done
  status
}

down() {
  for n in "${NODES[@]}"; do
    if running "$n"; then
      ctl "$n" -q stop || true
    fi
  done
  rm -rf "$BASE"
  echo "cluster down"
}

status() {
  local members
  members=$( (ctl 1 -q cluster_status --formatter json 2>/dev/null || true) | { grep -o 'commissaire-c[123]@localhost' || true; } | sort -u | wc -l)
  local listening=0
  for n in "${NODES[@]}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$((5680 + n))") 2>/dev/null; then
      listening=$((listening + 1))
    fi
  done
  echo "cluster: $members nodes known, $listening listening on 5681-5683"
  [ "$members" -ge 3 ] && [ "$listening" -eq 3 ]
}

leader() {
  local n
  for n in "${NODES[@]}"; do
    if running "$n"; then
      ctl "$n" -q list_queues name leader --no-table-headers 2>/dev/null |
        awk -v q="$1" '$1 == q { sub(/^commissaire-c/, "", $2); sub(/@.*/, "", $2); print $2; exit }'
      return
    fi
  done
}

cd "$(dirname "$0")/.."
case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  ctl) shift; n=$1; shift; ctl "$n" "$@" ;;
  leader) leader "$2" ;;
  *) echo "usage: $0 up|down|status|ctl N ARGS...|leader QUEUE" >&2; exit 2 ;;
esac
