#!/usr/bin/env bash
# A RabbitMQ cluster of the project's own on this machine, for the tests
# that stop or restart a broker (never the machine's own, on 5672):
#
#   scripts/rabbitmq-cluster.sh up      start and join the nodes (idempotent)
#   scripts/rabbitmq-cluster.sh down    stop them and remove their data
#   scripts/rabbitmq-cluster.sh status  whether all of them are clustered
#   scripts/rabbitmq-cluster.sh ctl N ARGS...   rabbitmqctl on node N
#   scripts/rabbitmq-cluster.sh leader QUEUE    the node number leading a
#                                               quorum queue
#   scripts/rabbitmq-cluster.sh down-when-gone PID
#                                       in the background: `down` as soon
#                                       as process PID is gone (a test's
#                                       teardown that a crash cannot skip)
#
# Settings, from the environment:
#   COMMISSAIRE_CLUSTER_DIR    data, logs and Erlang cookie
#                              (default /tmp/commissaire-rabbitmq-cluster)
#   COMMISSAIRE_CLUSTER_NODES  how many nodes (default 3)
#   COMMISSAIRE_CLUSTER_PORT   AMQP port of node 1, node N on PORT+N-1
#                              (default 5681)
#   COMMISSAIRE_CLUSTER_DIST_PORT  Erlang distribution port of node 1,
#                              likewise (default 25681)
#   COMMISSAIRE_CLUSTER_NAME   node name prefix: node N is NAME<N>@localhost
#                              (default commissaire-c)
# Tests give each run its own directory, ports and names, so that runs
# from several checkouts never meet.
#
# RabbitMQ comes from Debian's packages (scripts/ensure-brokers.sh
# installs them); the Debian wrapper switches to the rabbitmq user, so the
# nodes are started with the scripts under /usr/lib/rabbitmq/bin, as root.
set -euo pipefail

BASE=${COMMISSAIRE_CLUSTER_DIR:-/tmp/commissaire-rabbitmq-cluster}
COUNT=${COMMISSAIRE_CLUSTER_NODES:-3}
PORT=${COMMISSAIRE_CLUSTER_PORT:-5681}
DIST_PORT=${COMMISSAIRE_CLUSTER_DIST_PORT:-25681}
NAME=${COMMISSAIRE_CLUSTER_NAME:-commissaire-c}
BIN=/usr/lib/rabbitmq/bin
NODES=($(seq 1 "$COUNT"))

node_name() { echo "$NAME$1@localhost"; }
amqp_port() { echo $((PORT + $1 - 1)); }

node_env() {
  local n=$1
  export HOME="$BASE"
  # rabbitmqctl against a stopped node would leave erl_crash.dump here.
  export ERL_CRASH_DUMP=/dev/null
  export RABBITMQ_NODENAME="$(node_name "$n")"
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT="$(amqp_port "$n")"
  export RABBITMQ_DIST_PORT=$((DIST_PORT + n - 1))
  export RABBITMQ_MNESIA_BASE="$BASE/c$n/mnesia"
  export RABBITMQ_LOG_BASE="$BASE/c$n/log"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$BASE/enabled_plugins"
  export RABBITMQ_CONFIG_FILE="$BASE/c$n/rabbitmq"
  export RABBITMQ_PID_FILE="$BASE/c$n/pid"
}

ctl() {
  local n=$1
  shift
  (node_env "$n" && "$BIN/rabbitmqctl" -n "$(node_name "$n")" "$@")
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
      echo "node $(node_name "$n") did not start within 120 s; its log:" >&2
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
    printf 'listeners.tcp.default = 127.0.0.1:%s\nloopback_users = none\n' "$(amqp_port "$n")" >"$BASE/c$n/rabbitmq.conf"
    if running "$n"; then
      continue
    fi
    (node_env "$n" && "$BIN/rabbitmq-server" -detached)
  done
  for n in "${NODES[@]}"; do
    await_node "$n"
  done
  for n in "${NODES[@]:1}"; do
    if ctl "$n" -q cluster_status --formatter json 2>/dev/null | grep -q "$(node_name 1)"; then
      continue
    fi
    ctl "$n" -q stop_app
    ctl "$n" -q join_cluster "$(node_name 1)"
    ctl "$n" -q start_app
  done
  status
}

down() {
  for n in "${NODES[@]}"; do
    if running "$n"; then
      ctl "$n" -q stop || true
    fi
    # A node that does not answer rabbitmqctl (still booting, or hung)
    # goes too: by its own pid file, never by a name pattern.
    if [ -s "$BASE/c$n/pid" ]; then
      kill -9 "$(cat "$BASE/c$n/pid")" 2>/dev/null || true
    fi
  done
  rm -rf "$BASE"
  echo "cluster down"
}

status() {
  local members
  members=$( (ctl 1 -q cluster_status --formatter json 2>/dev/null || true) | { grep -o "$NAME[0-9]*@localhost" || true; } | sort -u | wc -l)
  local listening=0
  for n in "${NODES[@]}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$(amqp_port "$n")") 2>/dev/null; then
      listening=$((listening + 1))
    fi
  done
  echo "cluster: $members nodes known, $listening listening on $(amqp_port 1)-$(amqp_port "$COUNT")"
  [ "$members" -ge "$COUNT" ] && [ "$listening" -eq "$COUNT" ]
}

# Runs `down` once process $1 is gone, detached from the caller (its
# output in $BASE/../<dir>.down.log), so that a test killed or panicking
# still takes its nodes with it.
down_when_gone() {
  local pid=$1
  local log="$BASE.down.log"
  nohup setsid bash -c '
    while kill -0 "$1" 2>/dev/null; do sleep 1; done
    exec "$2" down
  ' _ "$pid" "$PWD/scripts/rabbitmq-cluster.sh" >"$log" 2>&1 </dev/null &
}

leader() {
  local n
  for n in "${NODES[@]}"; do
    if running "$n"; then
      ctl "$n" -q list_queues name leader --no-table-headers 2>/dev/null |
        awk -v q="$1" -v prefix="$NAME" '$1 == q && index($2, prefix) == 1 { $2 = substr($2, length(prefix) + 1); sub(/@.*/, "", $2); print $2; exit }'
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
  down-when-gone) down_when_gone "$2" ;;
  *) echo "usage: $0 up|down|status|ctl N ARGS...|leader QUEUE|down-when-gone PID" >&2; exit 2 ;;
esac
