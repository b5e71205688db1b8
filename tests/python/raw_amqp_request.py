"""Publishes one request with hostile AMQP properties, the way a sloppy or
hostile client can: py-amqp writes bytes properties and header keys as they
are, and RabbitMQ passes them through unchecked.

usage: raw_amqp_request.py EXCHANGE ROUTING_KEY BODY REPLY_TO PROPERTY HEX

PROPERTY is correlation_id, message_id, app_id, type, reply_to or
header_key; HEX its bytes (for reply_to, they replace REPLY_TO). The reply
is read by the caller (py-amqp itself cannot decode a reply whose
correlation_id is not UTF-8).
"""

import sys

import amqp


def main():
    exchange, routing_key, body, reply_to, prop, hex_bytes = sys.argv[1:7]
    raw = bytes.fromhex(hex_bytes)
    conn = amqp.Connection(host="127.0.0.1:5672", userid="guest", password="guest", virtual_host="/")
    conn.connect()
    ch = conn.channel()
    props = {"content_type": "application/json", "reply_to": reply_to}
    if prop == "header_key":
        props["application_headers"] = {raw: "x"}
    else:
        props[prop] = raw
    ch.basic_publish(amqp.Message(body, **props), exchange=exchange, routing_key=routing_key)
    conn.close()


if __name__ == "__main__":
    main()
