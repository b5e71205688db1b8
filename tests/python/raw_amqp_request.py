"""Publishes one request with hostile AMQP properties, the way a sloppy or
hostile client can: py-amqp writes bytes properties and header keys as they
are, and RabbitMQ passes them through unchecked.

usage: raw_amqp_request.py EXCHANGE ROUTING_KEY BODY REPLY_TO PROPERTY HEX

PROPERTY is correlation_id, message_id, app_id, type, reply_to or
header_key; HEX its bytes (for reply_to, they replace REPLY_TO). PROPERTY
deep_tables or deep_arrays nests the headers as deep as HEX says, in
decimal (tables in tables, or arrays in arrays under one key). The reply
is read by the caller (py-amqp itself cannot decode a reply whose
correlation_id is not UTF-8).
"""

import sys
import threading

import amqp


def nested(kind, depth):
    """Headers `depth` levels deep, the headers themselves counted."""
    value = {"k": None} if kind == "deep_tables" else []
    for _ in range(depth - 2):
        value = {"a": value} if kind == "deep_tables" else [value]
    return {"a": value}


def main():
    exchange, routing_key, body, reply_to, prop, hex_bytes = sys.argv[1:7]
    raw = b"" if prop.startswith("deep_") else bytes.fromhex(hex_bytes)
    conn = amqp.Connection(host="127.0.0.1:5672", userid="guest", password="guest", virtual_host="/")
    conn.connect()
    ch = conn.channel()
    props = {"content_type": "application/json", "reply_to": reply_to}
    if prop in ("deep_tables", "deep_arrays"):
        props["application_headers"] = nested(prop, int(hex_bytes))
    elif prop == "header_key":
        props["application_headers"] = {raw: "x"}
    else:
        props[prop] = raw
    ch.basic_publish(amqp.Message(body, **props), exchange=exchange, routing_key=routing_key)
    conn.close()


if __name__ == "__main__":
    # py-amqp writes nested tables by recursion: room for 100,000 levels.
    sys.setrecursionlimit(10**7)
    threading.stack_size(1 << 29)
    failed = []

    def run():
        try:
            main()
        except BaseException as e:  # noqa: BLE001 - reported as the exit status
            failed.append(repr(e))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if failed:
        sys.exit(f"raw_amqp_request.py: {failed[0]}")
