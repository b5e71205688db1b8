#!/usr/bin/env bash
# A private etcd for one test run: its own ports and data directory, the
# v2 keys API on (the API Commissaire's storage speaks), never the
# machine's etcd.
#
#   scripts/etcd.sh up DIR [CLIENT_PORT PEER_PORT] [--tls CERTDIR [--client-cert-auth]]
#       starts etcd with its data in DIR/data (DIR is created; it must not
#       hold a running etcd), waits until it answers, and prints
#       `http://127.0.0.1:CLIENT_PORT`. Ports default to free ones.
#       With --tls, clients speak only TLS to it (`https://...` is
#       printed): CERTDIR is what scripts/tls-ca.sh makes, server.pem and
#       server.key its certificate (--cert-file, --key-file). With
#       --client-cert-auth as well, it refuses clients without a
#       certificate from CERTDIR/ca.pem (--client-cert-auth
#       --trusted-ca-file: etcd turns client certificate checks on
#       whenever it is given a trusted CA). Peers stay on http (there are
#       none).
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
# no curl needed; over TLS, Python's ssl with CERTDIR's CA and client
# certificate).
answers() { # PORT [CERTDIR]
  local status
  if [ -n "${2:-}" ]; then
    timeout 2 python3 - "$1" "$2" <<'PY' 2>/dev/null
import http.client, ssl, sys
port, certs = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=certs + "/ca.pem")
ctx.load_cert_chain(certs + "/client.pem", certs + "/client.key")
conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=1.5)
conn.request("GET", "/v2/keys/")
sys.exit(0 if conn.getresponse().status == 200 else 1)
PY
    return
  fi
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

usage="usage: $0 up DIR [CLIENT_PORT PEER_PORT] [--tls CERTDIR [--client-cert-auth]] | down DIR"
certs=
client_cert_auth=
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --tls) [ $# -ge 2 ] || die "$usage"; certs=$2; shift 2 ;;
    --client-cert-auth) client_cert_auth=1; shift ;;
    --*) die "unknown option '$1'; $usage" ;;
    *) args+=("$1"); shift ;;
  esac
done
set -- "${args[@]}"
cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || die "$usage"
[ -z "$client_cert_auth" ] || [ -n "$certs" ] || die "--client-cert-auth needs --tls CERTDIR"

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
    tls=()
    if [ -n "$certs" ]; then
      certs=$(cd "$certs" && pwd)
      for f in ca.pem server.pem server.key; do
        [ -r "$certs/$f" ] || die "no $certs/$f (scripts/tls-ca.sh $certs makes it)"
      done
      url=https://127.0.0.1:$client
      tls=(--cert-file "$certs/server.pem" --key-file "$certs/server.key")
      [ -z "$client_cert_auth" ] || tls+=(--client-cert-auth --trusted-ca-file "$certs/ca.pem")
    fi
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
      "${tls[@]}" \
      </dev/null >"$dir/etcd.log" 2>&1 &
    echo $! >"$dir/etcd.pid"
    for _ in $(seq 1 200); do
      if ! kill -0 "$(cat "$dir/etcd.pid")" 2>/dev/null; then
        tail -n 20 "$dir/etcd.log" >&2
        rm -f "$dir/etcd.pid"
        die "etcd exited at start (log above)"
      fi
      # Up once the v2 keys API answers (not only the port).
      if answers "$client" "$certs"; then
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
