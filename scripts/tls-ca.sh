#!/usr/bin/env bash
# A throwaway certificate authority and a server and a client certificate
# it signed, for the TLS tests (`amqps://`, `rediss://`, etcd over
# `https://`) against servers of their own:
#
#   scripts/tls-ca.sh DIR
#
# writes DIR/ca.pem (the CA's certificate: what a client trusts, e.g.
# through SSL_CERT_FILE), DIR/server.pem and DIR/server.key (for the
# server; valid for localhost and 127.0.0.1, one day) and DIR/client.pem
# and DIR/client.key (a client certificate for mutual TLS, CN
# `commissaire test client`, one day). Keys are made fresh each time and
# never leave DIR (mode 0700).
set -euo pipefail

dir=${1:?usage: scripts/tls-ca.sh DIR}
mkdir -p "$dir"
chmod 700 "$dir"
cd "$dir"

openssl req -x509 -newkey rsa:2048 -nodes -days 1 \
  -keyout ca.key -out ca.pem -subj "/CN=commissaire test CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
  -subj "/CN=localhost" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' >server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
  -days 1 -out server.pem -extfile server.ext 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr \
  -subj "/CN=commissaire test client" 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >client.ext
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
  -days 1 -out client.pem -extfile client.ext 2>/dev/null
rm -f server.csr server.ext client.csr client.ext ca.srl
