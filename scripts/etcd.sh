#!/usr/bin/env bash
# A private etcd for one test run: its own ports and data directory, the
# v2 keys API on (the API Commissaire's storage speaks), never the
# machine's etcd.
#
#   scripts/etcd.sh up DIR [CLIENT_PORT PEER_PORT]
#       starts etcd with its data in DIR/data (DIR is created; it must not
#       hold a running etcd), waits until it answers, and prints
#       `http://127.0.0.1:CLIENT_PORT`. Ports default to free ones.
#   scripts/etcd.sh down DIR
#       stops the etcd of DIR (SIGTERM, then SIGKILL after 5 s) and
#       removes DIR. Safe to call twice, or for an etcd that never came up.
#
# Example:  dir=$(mktemp -d); url=$(scripts/etcd.sh up "$dir"); ...; scripts/etcd.sh down "$dir"
set -euo pipefail

die() { echo "etcd.sh: $*" >&2; exit 1; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Whether the v2 keys API on 127.0.0.1:PORT answers 200 (bash's /dev/tcp:
# no curl needed).
answers() { # PORT
  local status
  status=$(timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1 &&
    printf 'GET /v2/keys/ HTTP/1.0\r\n\r\n' >&3 && head -n 1 <&3" 2>/dev/null) || return 1
  [[ $status == *" 200 "* ]]
}

stop() { # DIR
  local pidfile=$1/etcd.pid pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || die "usage: $0 up DIR [CLIENT_PORT PEER_PORT] | down DIR"

case $cmd in
  up)
    command -v etcd >/dev/null || die "etcd not found (scripts/ensure-brokers.sh installs Debian's etcd-server)"
    mkdir -p "$dir"
    if [ -f "$dir/etcd.pid" ] && kill -0 "$(cat "$dir/etcd.pid")" 2>/dev/null; then
      die "$dir already holds a running etcd (pid $(cat "$dir/etcd.pid"))"
    fi
    client=${3:-$(free_port)}
    peer=${4:-$(free_port)}
    url=http://127.0.0.1:$client
    # Started in its own session, so that a Ctrl-C of the caller's
    # terminal reaches the caller, which then runs `down`.
    setsid etcd --name "test-$client" \
      --enable-v2=true \
      --data-dir "$dir/data" \
      --listen-client-urls "$url" --advertise-client-urls "$url" \
      --listen-peer-urls "http://127.0.0.1:$peer" \
      --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
      --initial-cluster "test-$client=http://127.0.0.1:$peer" \
      --initial-cluster-state new \
      --log-outputs stderr --logger zap \
      </dev/null >"$dir/etcd.log" 2>&1 &
    echo $! >"$dir/etcd.pid"
    for _ in $(seq 1 200); do
      if ! kill -0 "$(cat "$dir/etcd.pid")" 2>/dev/null; then
        tail -n 20 "$dir/etcd.log" >&2
        rm -f "$dir/etcd.pid"
        die "etcd exited at start (log above)"
      fi
      # Up once the v2 keys API answers (not only the port).
      if answers "$client"; then
        echo "$url"
        exit 0
      fi
      sleep 0.1
    done
    stop "$dir"
    die "etcd did not answer on $url within 20 s (log: $dir/etcd.log)"
    ;;
  down)
    stop "$dir"
    rm -rf "$dir"
    ;;
  *)
    die "unknown command '$cmd' (up or down)"
    ;;
esac
