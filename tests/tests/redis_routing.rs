//! Publishing through an exchange on Redis reads the binding set and
//! pushes in one script, routed by the members the connection last read:
//! a binding added or removed after a publisher's last publish counts for
//! its next one. On Redis database 3; each test leaves nothing behind.

use std::time::Duration;

use commissaire_e2e::host::{redis_command, redis_keys, redis_uri, unique};
use commissaire_host::bus::redis::{binding_key, binding_permanent_key, queue_lists, RedisBus};
use commissaire_host::bus::{BusError, BusTransport, Outgoing, QueueArguments};

fn message<'a>(exchange: &'a str, routing_key: &'a str, expires: bool) -> Outgoing<'a> {
    Outgoing {
        exchange,
        routing_key,
        body: b"{}",
        reply_to: None,
        correlation_id: None,
        durable: false,
        confirm: false,
        expires: expires.then_some(Duration::from_secs(5)),
        traceparent: None,
        deadline: None,
        reply_ttl: None,
    }
}

fn length(uri: &str, queue: &str) -> i64 {
    redis_command(uri, &["LLEN", queue]).int()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_routes_by_the_bindings_of_the_moment() {
    let uri = redis_uri(3, "");
    let before = redis_keys(&uri);
    let exchange = unique("routing-ex");
    let (first, second) = (unique("routing-a"), unique("routing-b"));
    let publisher = RedisBus::connect(&uri).await.expect("connect");
    let binder = RedisBus::connect(&uri).await.expect("connect");
    let args = QueueArguments::default();

    // Nothing bound yet: a request is unroutable, a notification dropped.
    let unroutable = publisher.publish(message(&exchange, "s.add", true)).await;
    assert!(
        matches!(unroutable, Err(BusError::Unroutable { .. })),
        "{unroutable:?}"
    );
    publisher
        .publish(message(&exchange, "s.add", false))
        .await
        .expect("a notification nobody hears is no error");

    // Bound by another connection after the publisher read the bindings.
    binder
        .declare_queue(&exchange, &first, "s.*", &args)
        .await
        .expect("bind");
    publisher
        .publish(message(&exchange, "s.add", true))
        .await
        .expect("routed to the new binding");
    assert_eq!(length(&uri, &first), 1);

    binder
        .declare_queue(&exchange, &second, "#", &args)
        .await
        .expect("bind");
    publisher
        .publish(message(&exchange, "s.add", true))
        .await
        .expect("routed to both");
    assert_eq!((length(&uri, &first), length(&uri, &second)), (2, 1));

    // Unbound: the publisher's remembered members no longer count.
    redis_command(
        &uri,
        &[
            "DEL",
            &binding_key(&exchange),
            &binding_permanent_key(&exchange),
        ],
    );
    let unroutable = publisher.publish(message(&exchange, "s.add", true)).await;
    assert!(
        matches!(unroutable, Err(BusError::Unroutable { .. })),
        "{unroutable:?}"
    );
    assert_eq!((length(&uri, &first), length(&uri, &second)), (2, 1));

    publisher.close().await;
    binder.close().await;
    let mut del = vec!["DEL".to_owned()];
    del.extend(queue_lists(&first));
    del.extend(queue_lists(&second));
    let del: Vec<&str> = del.iter().map(String::as_str).collect();
    redis_command(&uri, &del);
    let left: Vec<String> = redis_keys(&uri).difference(&before).cloned().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
