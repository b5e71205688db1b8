#!/usr/bin/env python3
"""A double of the original Python Commissaire service
(``commissaire_service.service.CommissaireService``), for the tests of
mixed deployments, written from its observed behaviour:

- a kombu ``ConsumerMixin`` consuming its queues, bound to the topic
  exchange with their routing keys (kombu's queue defaults: durable, not
  exclusive, not auto-delete), with no prefetch limit;
- a message whose ``method`` matches the routing key's last segment calls
  ``on_<method>(message, *params)`` (or ``**params``); a failure becomes a
  JSON-RPC error (-32601 for a missing method);
- when the message has ``reply_to``, it replies with
  ``connection.SimpleQueue(reply_to).put(json.dumps(response))``: kombu
  *declares* a queue named ``reply_to`` with its defaults and a direct
  exchange of the same name, binds them, and publishes the JSON text
  there (``text/plain``); then it acks the request.

Usage:
    commissaire_service.py serve URI EXCHANGE QUEUE=ROUTING_KEY [...]

Prints ``ready`` once consuming, then one JSON line per handled message:
``{"routing_key", "reply_to", "id", "params"}``. On SIGTERM or SIGINT it
stops and deletes its queues (the test's cleanup, not the original's).

Methods: ``add(x, y)``; ``nothing(...)`` returns ``None``, as storage's
``delete`` or containermgr's ``register_node`` do; ``slow(seconds)``
sleeps, then returns ``"slept"``.
"""

import json
import signal
import sys
import time

import kombu
from kombu.mixins import ConsumerMixin


class Service(ConsumerMixin):

    def __init__(self, uri, exchange, bindings):
        self.connection = kombu.Connection(uri)
        self.exchange = kombu.Exchange(exchange, type='topic')
        self.queues = [kombu.Queue(name, self.exchange, routing_key=key)
                       for name, key in bindings]

    def get_consumers(self, Consumer, channel):
        return [Consumer(queues=self.queues, callbacks=[self.on_message],
                         accept=['json', 'text/plain'])]

    def on_consume_ready(self, connection, channel, consumers, **kwargs):
        print('ready', flush=True)

    def on_message(self, body, message):
        expected = message.delivery_info['routing_key'].rsplit('.', 1)[-1]
        uid = -1
        try:
            if isinstance(body, (str, bytes)):
                body = json.loads(body)
            uid = body.get('id', -1)
            params = body.get('params', [])
            print(json.dumps({
                'routing_key': message.delivery_info['routing_key'],
                'reply_to': message.properties.get('reply_to'),
                'id': uid,
                'params': params,
            }), flush=True)
            if body.get('method') != expected:
                raise ValueError('method does not match the routing key')
            method = getattr(self, 'on_' + body['method'])
            if isinstance(params, dict):
                result = method(message=message, **params)
            else:
                result = method(message, *params)
            response = {'jsonrpc': '2.0', 'id': uid, 'result': result}
        except Exception as error:
            code = -32601 if isinstance(error, AttributeError) else -32600
            response = {'jsonrpc': '2.0', 'id': uid, 'error': {
                'code': code, 'message': str(error),
                'data': {'exception': str(type(error))}}}
        reply_to = message.properties.get('reply_to')
        if reply_to:
            response_queue = self.connection.SimpleQueue(reply_to)
            response_queue.put(json.dumps(response))
            response_queue.close()
        message.ack()

    def on_add(self, message, x, y):
        return x + y

    def on_nothing(self, message, *args, **kwargs):
        return None

    def on_slow(self, message, seconds):
        time.sleep(seconds)
        return 'slept'


def serve(uri, exchange, specs):
    service = Service(uri, exchange, [spec.split('=', 1) for spec in specs])

    def stop(*_):
        service.should_stop = True
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    service.run()
    with service.connection.channel() as channel:
        for queue in service.queues:
            bound = queue(channel)
            bound.declare()
            bound.delete()
    service.connection.release()
    return 0


if __name__ == '__main__':
    if len(sys.argv) < 5 or sys.argv[1] != 'serve':
        sys.exit(__doc__)
    sys.exit(serve(sys.argv[2], sys.argv[3], sys.argv[4:]))
