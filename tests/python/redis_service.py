#!/usr/bin/env python3
"""A Python Commissaire service on kombu, for the Redis tests, modelled on
``commissaire_service.service.CommissaireService``: a ``ConsumerMixin``
consuming its queues bound to the topic exchange, calling ``on_<method>``,
and replying with ``producer.publish(response, routing_key=reply_to)`` on
the default exchange.

Usage:
    redis_service.py serve URI EXCHANGE QUEUE=ROUTING_KEY [QUEUE=ROUTING_KEY ...]
    redis_service.py quiet URI EXCHANGE QUEUE=ROUTING_KEY [QUEUE=ROUTING_KEY ...]
    redis_service.py notify URI EXCHANGE ROUTING_KEY PARAMS_JSON

``serve`` prints ``ready`` once consuming, then one JSON line per message:
``{"routing_key", "reply_to", "body"}``; it stops on SIGTERM or
SIGINT and then deletes its queues and their bindings. ``quiet`` serves
without printing a line per message (what ``scripts/bench-redis.sh``
measures the host against). ``notify`` sends a
notification as ``BusMixin.notify`` does (no ``reply_to``, no ``id``).

The URI query may hold kombu transport options (``visibility_timeout``).
"""

import json
import signal
import sys
import urllib.parse

import kombu
from kombu.mixins import ConsumerMixin


def connection(uri):
    base, _, query = uri.partition('?')
    options = {k: float(v) for k, v in urllib.parse.parse_qsl(query)}
    return kombu.Connection(base, transport_options=options)


class Service(ConsumerMixin):

    def __init__(self, conn, exchange, bindings, quiet=False):
        self.connection = conn
        self.quiet = quiet
        self.exchange = kombu.Exchange(exchange, type='topic')
        self.queues = [kombu.Queue(name, self.exchange, routing_key=key)
                       for name, key in bindings]
        self.producer = conn.Producer(serializer='json')

    def get_consumers(self, Consumer, channel):
        return [Consumer(queues=self.queues, callbacks=[self.on_message],
                         accept=['json', 'text/plain'])]

    def on_consume_ready(self, connection, channel, consumers, **kwargs):
        print('ready', flush=True)

    def on_message(self, body, message):
        if isinstance(body, (str, bytes)):
            body = json.loads(body)
        info = message.delivery_info
        reply_to = message.properties.get('reply_to')
        if not self.quiet:
            print(json.dumps({
                'routing_key': info.get('routing_key'),
                'reply_to': reply_to,
                'body': body,
            }), flush=True)
        id = body.get('id')
        try:
            method = getattr(self, 'on_' + body['method'])
            params = body.get('params', [])
            if isinstance(params, dict):
                result = method(message=message, **params)
            else:
                result = method(message, *params)
            response = {'jsonrpc': '2.0', 'id': id, 'result': result}
        except AttributeError:
            response = {'jsonrpc': '2.0', 'id': id, 'error': {
                'code': -32601, 'message': 'Method not found'}}
        except Exception as error:
            response = {'jsonrpc': '2.0', 'id': id, 'error': {
                'code': -32603, 'message': str(error)}}
        if reply_to:
            self.producer.publish(response, routing_key=reply_to)
        message.ack()

    def on_add(self, message, x, y):
        return x + y

    def on_seen(self, message, **params):
        return None


def serve(uri, exchange, specs, quiet=False):
    bindings = [spec.split('=', 1) for spec in specs]
    with connection(uri) as conn:
        service = Service(conn, exchange, bindings, quiet)

        def stop(*_):
            service.should_stop = True
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        service.run()
        # ConsumerMixin consumed on a clone of `conn`, whose bindings this
        # connection does not know: declare them here, then delete.
        with conn.channel() as channel:
            for queue in service.queues:
                bound = queue(channel)
                bound.declare()
                bound.delete()
    return 0


def notify(uri, exchange, routing_key, params):
    with connection(uri) as conn:
        ex = kombu.Exchange(exchange, type='topic')
        msg = {'jsonrpc': '2.0', 'method': routing_key.rsplit('.', 1)[-1],
               'params': json.loads(params)}
        conn.Producer().publish(msg, routing_key=routing_key, exchange=ex,
                                declare=[ex])
    return 0


if __name__ == '__main__':
    command, args = sys.argv[1], sys.argv[2:]
    if command in ('serve', 'quiet'):
        sys.exit(serve(args[0], args[1], args[2:], command == 'quiet'))
    sys.exit(notify(*args))
