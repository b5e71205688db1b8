//! A broker outage as the README's "Reliability" table tells it: the
//! workers stay, `/healthz` answers 503 naming the service `not consuming`
//! meanwhile, and they consume again once the broker is back. The outage
//! is played by a TCP proxy of the test's own between the host and the
//! machine's RabbitMQ, cut and restored: the broker itself is never
//! stopped.

use std::time::Duration;

use commissaire_e2e::host::{unique, HostSpec, TestHost};
use commissaire_e2e::probe::{amqp_addr, amqp_uri_via, wait_for_host, CuttableProxy, RawCaller};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn healthz_answers_503_while_the_broker_is_away_and_200_once_it_is_back() {
    let proxy = CuttableProxy::start(amqp_addr());
    let mut spec = HostSpec::amqp();
    spec.plugins = vec!["simple"];
    spec.suffix = unique("gap");
    spec.exchange = unique("gap-ex");
    spec.bus_uri = amqp_uri_via(&proxy);
    let host = TestHost::start(spec);
    let workers = host.worker_pids("simple");
    assert_eq!(workers.len(), 1, "{:?}", host.health());

    proxy.cut();
    wait_for_host(&host, Duration::from_secs(30), "/healthz says 503", || {
        host.health().0 == 503
    });
    let (status, health) = host.health();
    assert_eq!(status, 503);
    assert_eq!(
        health["services"]["simple"]["status"], "not consuming",
        "{health}"
    );
    assert_eq!(
        host.worker_pids("simple"),
        workers,
        "the worker stays through the outage"
    );

    proxy.restore();
    wait_for_host(
        &host,
        Duration::from_secs(60),
        "/healthz says 200 again",
        || host.health().0 == 200,
    );
    assert_eq!(host.worker_pids("simple"), workers, "the same worker");
    // And it serves: a caller on the broker itself is answered.
    let mut caller = RawCaller::connect(&host.spec.exchange).await;
    caller
        .send(
            "simple.add",
            &json!({"jsonrpc": "2.0", "id": "after", "method": "add", "params": [1, 2]}),
            None,
        )
        .await;
    assert_eq!(caller.next(Duration::from_secs(30)).await.body["result"], 3);
    caller.close().await;
    drop(host);
}
