//! Two deployments on one RabbitMQ vhost, kept apart by `[bus] exchange`
//! and `[bus] queue_prefix` (README, "Running it for real"): each answers
//! its own callers, and never takes the other's requests.

use commissaire_e2e::host::{cleanup_broker, unique, HostSpec, TestHost};
use serde_json::json;

#[test]
fn two_deployments_on_one_vhost_never_take_each_others_requests() {
    // The same queue suffix for both: without their prefixes the two
    // would consume one queue, and answer each other's callers.
    let suffix = unique("q");
    let spec = |deployment: &str| HostSpec {
        plugins: vec!["demo"],
        suffix: suffix.clone(),
        bus_toml: format!("queue_prefix = \"{deployment}.\""),
        service_toml: format!("config = {{ greeting = \"{deployment}\" }}\n"),
        ..HostSpec::amqp()
    };
    let staging = TestHost::start(spec("staging"));
    let production = TestHost::start(spec("production"));
    let queue = staging.spec.queue("demo");
    let mut answered = Vec::new();
    // One deployment's calls after the other's: a broker handing a shared
    // queue's messages to its consumers in turn would give half of them to
    // the wrong one (alternating the callers could hide that).
    for (host, deployment) in [(&staging, "staging"), (&production, "production")] {
        for id in 0..40 {
            let (status, reply) =
                host.http_call("demo.greet", &json!({"id": id, "params": ["you"]}));
            answered.push((deployment, status, reply["result"].clone()));
        }
    }
    drop(staging);
    drop(production);
    cleanup_broker(
        "",
        &[format!("staging.{queue}"), format!("production.{queue}")],
    );
    let wrong: Vec<_> = answered
        .iter()
        .filter(|(deployment, status, result)| {
            (*status, result) != (200, &json!(format!("{deployment}, you!")))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} calls answered by the other deployment or not at all: {wrong:?}",
        wrong.len(),
        answered.len()
    );
}
