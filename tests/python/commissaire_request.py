#!/usr/bin/env python3
"""One JSON-RPC request over kombu, the way Commissaire's
``commissaire.bus.BusMixin.request`` makes it.

Usage:
    commissaire_request.py AMQP_URI EXCHANGE ROUTING_KEY METHOD PARAMS_JSON
                           [--raw-body BODY_JSON]

Prints the reply's payload as JSON on stdout (exit 0), or a message on
stderr and exit 3 if no reply comes within 10 seconds. The request sent is
logged on stderr as ``request: {...}`` so callers can check the echoed id.
With ``--raw-body`` the given JSON object is published instead of the
request built from METHOD and PARAMS_JSON (for malformed requests).
"""

import argparse
import json
import queue
import sys
import uuid

import kombu


def main():
    parser = argparse.ArgumentParser()
    for name in ('uri', 'exchange', 'routing_key', 'method', 'params'):
        parser.add_argument(name)
    parser.add_argument('--raw-body')
    args = parser.parse_args()

    id = str(uuid.uuid4())
    response_queue_name = 'response-' + id
    with kombu.Connection(args.uri) as connection:
        exchange = kombu.Exchange(args.exchange, type='topic')
        response_queue = connection.SimpleQueue(
            response_queue_name,
            queue_opts={'auto_delete': True, 'durable': False})

        if args.raw_body is not None:
            msg = json.loads(args.raw_body)
        else:
            msg = {
                'jsonrpc': '2.0',
                'id': id,
                'method': args.method,
                'params': json.loads(args.params),
            }
        print('request: ' + json.dumps(msg), file=sys.stderr)
        producer = connection.Producer()
        producer.publish(
            msg, routing_key=args.routing_key, exchange=exchange,
            declare=[exchange], reply_to=response_queue_name)

        try:
            reply = response_queue.get(block=True, timeout=10)
        except queue.Empty:
            print('no reply on {} within 10 s'.format(response_queue_name),
                  file=sys.stderr)
            return 3
        finally:
            # Not in BusMixin: SimpleQueue also declared a durable direct
            # exchange named after the queue, which would stay behind.
            response_queue.producer.exchange.delete()
        reply.ack()
        response_queue.clear()
        response_queue.close()
        print(json.dumps(reply.payload))
        return 0


if __name__ == '__main__':
    sys.exit(main())
