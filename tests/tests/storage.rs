//! The `storage` plugin through the real host on RabbitMQ, against a real
//! etcd of each test's own (`scripts/etcd.sh`): every method on the model
//! classes, lists, the original's errors, the notifications, routing by
//! `storage_handlers`, etcd going away, and the requests captured from the
//! original (`wire.txt`, see README of plugins/storage) replayed.
//!
//! Every broker name starts with `st-` and is unique per test; each test
//! removes its queues and exchange. Needs `etcd` (Debian's `etcd-server`,
//! which scripts/ensure-brokers.sh installs).

use std::time::Duration;

use commissaire_e2e::etcd::{EtcdTls, PrivateCustodia, PrivateEtcd};
use commissaire_e2e::host::{cleanup_broker, unique, AmqpCaller, HostSpec, ReplyQueue, TestHost};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{json, Value};

/// A host serving the storage plugin on its own queue and exchange, a
/// private etcd, and a queue bound to `notify.storage.*.*`.
struct Rig {
    host: TestHost,
    etcd: PrivateEtcd,
    caller: AmqpCaller,
    events: lapin::Consumer,
    queues: Vec<String>,
}

/// The `[[service]]` entry of the storage plugin on `queue`, with
/// `config` (a TOML inline table).
fn storage_service(queue: &str, config: &str) -> String {
    format!(
        "[[service]]\nname = \"storage\"\nqueues = [{{ name = \"{queue}\", routing_key = \"storage.*\" }}]\nconfig = {config}\n"
    )
}

impl Rig {
    /// Every model on the test's etcd.
    async fn start() -> Self {
        Self::start_with(|url| {
            format!(
                "{{ storage_handlers = [{{ type = \"etcd\", server_url = \"{url}\", models = [\"*\"] }}] }}"
            )
        })
        .await
    }

    /// The plugin configured by `config(etcd url)`.
    async fn start_with(config: impl FnOnce(&str) -> String) -> Self {
        Self::start_on(PrivateEtcd::start(), |etcd| config(&etcd.url)).await
    }

    /// The plugin configured by `config(etcd)`, on `etcd`.
    async fn start_on(etcd: PrivateEtcd, config: impl FnOnce(&PrivateEtcd) -> String) -> Self {
        let queue = unique("st-storage");
        let notify_queue = unique("st-notify");
        let spec = HostSpec {
            plugins: vec!["storage"],
            exchange: unique("st-ex"),
            ..HostSpec::amqp()
        };
        let mut host =
            TestHost::start_with_services(spec, &storage_service(&queue, &config(&etcd)));
        host.also_clean([queue.clone()]);
        let caller = AmqpCaller::connect(&host.spec.exchange).await;
        let events = listen(&host.spec.exchange, &notify_queue).await;
        Self {
            host,
            etcd,
            caller,
            events,
            queues: vec![queue, notify_queue],
        }
    }

    /// The whole reply to `storage.<method>` with `params`.
    async fn reply(&self, method: &str, params: Value) -> Value {
        let body =
            json!({"jsonrpc": "2.0", "id": unique("st-id"), "method": method, "params": params});
        self.caller
            .call(
                &format!("storage.{method}"),
                body.to_string().as_bytes(),
                ReplyQueue::AutoDelete,
                None,
            )
            .await
            .body
    }

    /// The result of `storage.<method>`; fails on an error reply.
    async fn ok(&self, method: &str, params: Value) -> Value {
        let reply = self.reply(method, params).await;
        assert!(
            reply.get("error").is_none() && reply.get("result").is_some(),
            "storage.{method}: {reply}\n{}",
            self.host.stderr()
        );
        reply["result"].clone()
    }

    /// The error of `storage.<method>`; fails on a result.
    async fn err(&self, method: &str, params: Value) -> Value {
        let reply = self.reply(method, params).await;
        assert!(
            reply.get("result").is_none(),
            "storage.{method} succeeded: {reply}"
        );
        reply["error"].clone()
    }

    /// The next storage notification: (routing key, what it carries).
    async fn event(&mut self) -> (String, Value) {
        let delivery = self.delivery().await;
        let body: Value = serde_json::from_slice(&delivery.data).expect("notification is JSON");
        (delivery.routing_key.to_string(), notification_of(body))
    }

    /// The next storage notification as it came off the queue.
    async fn delivery(&mut self) -> lapin::message::Delivery {
        tokio::time::timeout(Duration::from_secs(10), self.events.next())
            .await
            .expect("a storage notification within 10 s")
            .expect("consumer open")
            .expect("delivery")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        cleanup_broker(&self.host.spec.exchange, &self.queues);
    }
}

/// A notification's body: `{event, class, model}` itself, as the original
/// sent it, no JSON-RPC envelope around it.
fn notification_of(body: Value) -> Value {
    let keys: Vec<&str> = body
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    assert_eq!(keys, ["class", "event", "model"], "{body}");
    body
}

async fn listen(exchange: &str, queue: &str) -> lapin::Consumer {
    let conn = lapin::Connection::connect(
        &commissaire_e2e::host::amqp_uri(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare the notification queue");
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        "notify.storage.*.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind notify.storage.*.*");
    let consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    // The connection lives as long as the consumer needs it.
    std::mem::forget(conn);
    consumer
}

fn params(model_type_name: &str, data: Value) -> Value {
    json!({"model_type_name": model_type_name, "model_json_data": data})
}

/// A model class, a minimal model of it, and the full model the original
/// answers for it (defaults applied).
fn classes() -> Vec<(&'static str, Value, Value)> {
    vec![
        (
            "Cluster",
            json!({"name": "st-c1"}),
            json!({"name": "st-c1", "status": "", "network": "default", "hostset": [],
                   "container_manager": ""}),
        ),
        (
            "Host",
            json!({"address": "10.9.8.7"}),
            json!({"address": "10.9.8.7", "status": "", "os": "", "cpus": 0, "memory": 0,
                   "space": 0, "last_check": "", "source": ""}),
        ),
        (
            "Network",
            json!({"name": "st-n1"}),
            json!({"name": "st-n1", "type": "flannel_etcd", "options": {}}),
        ),
        (
            "ContainerManagerConfig",
            json!({"name": "st-m1"}),
            json!({"name": "st-m1", "type": "openshift", "options": {}}),
        ),
        (
            "ClusterDeploy",
            json!({"name": "st-c1", "version": "7"}),
            json!({"name": "st-c1", "status": "", "version": "7", "deployed": [],
                   "in_process": [], "started_at": "", "finished_at": ""}),
        ),
        (
            "ClusterRestart",
            json!({"name": "st-c1"}),
            json!({"name": "st-c1", "status": "", "restarted": [], "in_process": [],
                   "started_at": "", "finished_at": ""}),
        ),
        (
            "ClusterUpgrade",
            json!({"name": "st-c1"}),
            json!({"name": "st-c1", "status": "", "upgraded": [], "in_process": [],
                   "started_at": "", "finished_at": ""}),
        ),
    ]
}

/// What notifications and lookup errors carry: without hidden attributes.
fn safe(class: &str, mut model: Value) -> Value {
    if class == "Cluster" {
        model.as_object_mut().map(|m| m.remove("hostset"));
    }
    model
}

#[tokio::test(flavor = "multi_thread")]
async fn every_method_on_every_class_with_its_notifications() {
    let mut rig = Rig::start().await;
    for (class, minimal, full) in classes() {
        // Created: the full model back, and a `created` notification.
        assert_eq!(
            rig.ok("save", params(class, minimal.clone())).await,
            full,
            "{class}"
        );
        assert_eq!(
            rig.event().await,
            (
                format!("notify.storage.{class}.created"),
                json!({"event": "created", "class": class, "model": safe(class, full.clone())})
            )
        );
        assert_eq!(
            rig.ok("get", params(class, minimal.clone())).await,
            full,
            "{class}"
        );

        // Saved again (status changed): `updated`, and the new value wins.
        let mut changed = full.clone();
        if full.get("status").is_some() {
            changed["status"] = json!("st-changed");
        } else {
            changed["options"] = json!({"st": "changed"});
        }
        assert_eq!(
            rig.ok("save", params(class, changed.clone())).await,
            changed,
            "{class}"
        );
        assert_eq!(
            rig.event().await,
            (
                format!("notify.storage.{class}.updated"),
                json!({"event": "updated", "class": class, "model": safe(class, changed.clone())})
            )
        );
        assert_eq!(rig.ok("get", params(class, minimal.clone())).await, changed);

        // Deleted: null, a `deleted` notification with the model as it was,
        // then a lookup error.
        assert_eq!(
            rig.ok("delete", params(class, minimal.clone())).await,
            Value::Null
        );
        assert_eq!(
            rig.event().await,
            (
                format!("notify.storage.{class}.deleted"),
                json!({"event": "deleted", "class": class, "model": safe(class, changed.clone())})
            )
        );
        let err = rig.err("get", params(class, minimal.clone())).await;
        assert_eq!(err["code"], -20000, "{class}: {err}");
        assert_eq!(err["data"]["model_type_name"], class);
        assert_eq!(
            err["data"]["model_json_data"],
            json!([safe(class, full.clone())])
        );
        let err = rig.err("delete", params(class, minimal)).await;
        assert_eq!(err["code"], -20000, "{class}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_of_models_in_one_call_and_list() {
    let mut rig = Rig::start().await;
    // Nothing stored yet: empty lists (the original answered -32600).
    for list in ["Hosts", "Clusters", "Networks", "ContainerManagerConfigs"] {
        assert_eq!(
            rig.ok("list", json!({"model_type_name": list})).await,
            json!([]),
            "{list}"
        );
    }
    let hosts: Vec<Value> = (1..=3)
        .map(|i| json!({"address": format!("10.0.0.{i}"), "cpus": i}))
        .collect();
    let saved = rig
        .ok("save", params("Host", Value::Array(hosts.clone())))
        .await;
    let saved = saved.as_array().expect("a list for a list").clone();
    assert_eq!(saved.len(), 3);
    for (i, host) in saved.iter().enumerate() {
        assert_eq!(host["address"], hosts[i]["address"]);
        assert_eq!(host["cpus"], hosts[i]["cpus"]);
        assert_eq!(host["os"], "");
        assert_eq!(rig.event().await.0, "notify.storage.Host.created");
    }
    // A model may come as a JSON string, alone or in a list.
    let as_text = json!(["{\"address\": \"10.0.0.2\"}", {"address": "10.0.0.3"}]);
    let got = rig.ok("get", params("Host", as_text)).await;
    assert_eq!(got, json!([saved[1], saved[2]]));
    let got = rig
        .ok("get", params("Host", json!("{\"address\": \"10.0.0.1\"}")))
        .await;
    assert_eq!(got, saved[0]);

    let listed = rig.ok("list", json!({"model_type_name": "Hosts"})).await;
    assert_eq!(listed, Value::Array(saved.clone()));
    // A record etcd holds that is not a model is skipped, not fatal.
    ureq::put(&format!("{}/v2/keys/commissaire/hosts/junk", rig.etcd.url))
        .send_form([("value", "{\"not\": \"a host\"}")])
        .expect("write junk to etcd");
    assert_eq!(
        rig.ok("list", json!({"model_type_name": "Hosts"})).await,
        Value::Array(saved.clone())
    );

    // A list whose one item is invalid changes nothing.
    let err = rig
        .err(
            "delete",
            params("Host", json!([{"address": "10.0.0.1"}, {"cpus": 1}])),
        )
        .await;
    assert_eq!(err["code"], -32600, "{err}");
    assert_eq!(
        rig.ok("list", json!({"model_type_name": "Hosts"}))
            .await
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    rig.ok(
        "delete",
        params(
            "Host",
            json!([{"address": "10.0.0.1"}, {"address": "10.0.0.2"}]),
        ),
    )
    .await;
    assert_eq!(
        rig.ok("list", json!({"model_type_name": "Hosts"})).await,
        json!([saved[2]])
    );
    for host in &saved[..2] {
        assert_eq!(
            rig.event().await,
            (
                "notify.storage.Host.deleted".to_owned(),
                json!({"event": "deleted", "class": "Host", "model": host})
            )
        );
    }

    for (class, list, model) in [
        (
            "Network",
            "Networks",
            json!({"name": "st-net", "options": {"a": 1}}),
        ),
        (
            "ContainerManagerConfig",
            "ContainerManagerConfigs",
            json!({"name": "st-cm", "type": "trivial"}),
        ),
    ] {
        let saved = rig.ok("save", params(class, model)).await;
        assert_eq!(
            rig.event().await.0,
            format!("notify.storage.{class}.created")
        );
        assert_eq!(
            rig.ok("list", json!({"model_type_name": list})).await,
            json!([saved]),
            "{list}"
        );
    }

    // Clusters keep their hidden hostset in a listing (to_dict), as saved.
    let c = rig
        .ok(
            "save",
            params("Cluster", json!({"name": "st-c", "hostset": ["10.0.0.3"]})),
        )
        .await;
    assert_eq!(
        rig.ok("list", json!({"model_type_name": "Clusters"})).await,
        json!([c])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_originals_validation_errors() {
    let rig = Rig::start().await;
    let exception = |e: &Value| {
        e["data"]["exception"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };

    let e = rig
        .err(
            "save",
            params("Host", json!({"address": "a", "cpus": "2", "memory": 1.5})),
        )
        .await;
    assert_eq!(e["code"], -32600);
    assert_eq!(
        e["message"],
        "('Host instance is invalid due to 2 errors.', [\"Host.cpus: Expected type <class 'int'>. \
         Got <class 'str'>\", \"Host.memory: Expected type <class 'int'>. Got <class 'float'>\"])"
    );
    assert_eq!(
        exception(&e),
        "<class 'commissaire.models.ValidationError'>"
    );

    // A primary key that would climb to another model's path in etcd
    // (`/commissaire/hosts/../clusters/x`) or custodia: refused, and
    // nothing written where it points.
    for (method, class, data) in [
        ("save", "Host", json!({"address": "../clusters/x"})),
        ("save", "Host", json!({"address": ".."})),
        ("delete", "Host", json!({"address": "../clusters/x"})),
        ("save", "HostCreds", json!({"address": "../../x"})),
    ] {
        let e = rig.err(method, params(class, data.clone())).await;
        assert_eq!(e["code"], -32600, "{method} {data}: {e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap_or_default()
                .contains("cannot be a store key: it must not hold"),
            "{method} {data}: {e}"
        );
    }
    let e = rig
        .err("get", params("Cluster", json!({"name": "x"})))
        .await;
    assert_eq!(e["code"], -20000, "no cluster `x` was written: {e}");

    let e = rig
        .err(
            "save",
            params("Network", json!({"name": "n", "type": "bogus"})),
        )
        .await;
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Container type must be one of the following: flannel_etcd, flannel_server"),
        "{e}"
    );
    let e = rig
        .err("save", params("ClusterDeploy", json!({"name": "c"})))
        .await;
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("version must be a non empty string"),
        "{e}"
    );

    let e = rig
        .err("get", params("Host", json!({"os": "fedora"})))
        .await;
    assert_eq!(e["code"], -32600);
    assert_eq!(
        e["message"],
        "Host.__init__() missing 1 or more required keyword arguments: \
         address, status, os, cpus, memory, space, last_check, source"
    );
    assert_eq!(exception(&e), "<class 'TypeError'>");

    let e = rig.err("list", json!({"model_type_name": "Nope"})).await;
    assert_eq!(
        (e["code"].clone(), e["message"].clone()),
        (json!(-32600), json!("'Nope'"))
    );
    assert_eq!(exception(&e), "<class 'KeyError'>");

    let e = rig.err("save", params("Host", json!("{not json"))).await;
    assert_eq!(e["code"], -32700, "{e}");

    // Nothing of the above reached etcd.
    assert_eq!(
        rig.ok("list", json!({"model_type_name": "Hosts"})).await,
        json!([])
    );
    assert_eq!(
        rig.ok("list", json!({"model_type_name": "Networks"})).await,
        json!([])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_handlers_route_by_pattern_and_host_source() {
    // Nothing listens on `dead`: what is routed there fails, the rest works.
    let dead = format!("http://{}", commissaire_e2e::host::free_addr());
    let dead_for_config = dead.clone();
    let rig = Rig::start_with(move |url| {
        format!(
            "{{ storage_handlers = [\
               {{ type = \"etcd\", name = \"st-dead\", server_url = \"{dead_for_config}\", models = [\"Host*\"] }}, \
               {{ type = \"commissaire.storage.etcd\", server_url = \"{url}\", models = [\"Cluster*\", \"Network*\"] }}] }}"
        )
    })
    .await;
    rig.ok("save", params("Cluster", json!({"name": "st-routed"})))
        .await;
    let e = rig
        .err("save", params("Host", json!({"address": "10.1.1.1"})))
        .await;
    assert_eq!(e["code"], -32600, "{e}");
    assert!(
        e["message"].as_str().unwrap_or_default().contains(&dead),
        "{e}"
    );
    // A Host whose `source` names a handler goes there instead.
    let h = rig
        .ok(
            "save",
            params(
                "Host",
                json!({"address": "10.1.1.2", "source": "commissaire.storage.etcd"}),
            ),
        )
        .await;
    assert_eq!(h["source"], "commissaire.storage.etcd");
    let e = rig
        .err(
            "save",
            params("Host", json!({"address": "10.1.1.3", "source": "st-nope"})),
        )
        .await;
    assert_eq!(e["message"], "'st-nope'");
    // A class no pattern routes has no handler.
    let e = rig
        .err(
            "save",
            params("ContainerManagerConfig", json!({"name": "m"})),
        )
        .await;
    assert_eq!(
        e["message"],
        "<class 'commissaire.models.ContainerManagerConfig'>"
    );

    let handlers = rig.ok("list_store_handlers", json!({})).await;
    assert_eq!(
        handlers,
        json!([
            {"handler_type": "CustodiaStoreHandler",
             "config": {"name": "commissaire_service.storage.custodia"},
             "model_types": ["HostCreds", "SecretModel"]},
            {"handler_type": "EtcdStoreHandler",
             "config": {"name": "st-dead", "server_url": dead},
             "model_types": ["Host", "HostStatus", "Hosts"]},
            {"handler_type": "EtcdStoreHandler",
             "config": {"name": "commissaire.storage.etcd", "server_url": rig.etcd.url},
             "model_types": ["Cluster", "ClusterDeploy", "ClusterRestart", "ClusterUpgrade",
                             "Clusters", "Network", "Networks"]},
        ])
    );
}

fn assert_etcd_failed(method: &str, e: &Value, url: &str, why: &str) {
    assert_eq!(e["code"], -32600, "{method}: {e}");
    let message = e["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("Connection to etcd failed due to"),
        "{method}: {e}"
    );
    assert!(
        message.contains(url) && message.contains(why),
        "{method}: {e}"
    );
    assert_eq!(
        e["data"]["exception"],
        "<class 'etcd.EtcdConnectionFailed'>"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_down_is_a_clear_error_not_a_hang() {
    let rig = Rig::start().await;
    rig.ok("save", params("Host", json!({"address": "10.2.2.2"})))
        .await;

    // Hung: the plugin's time limit answers, well before the caller's 30 s.
    rig.etcd.freeze();
    let e = rig
        .err("get", params("Host", json!({"address": "10.2.2.2"})))
        .await;
    assert_etcd_failed("get", &e, &rig.etcd.url, "timeout");

    // Gone: refused at once.
    rig.etcd.stop();
    for (method, p) in [
        ("get", params("Host", json!({"address": "10.2.2.2"}))),
        ("save", params("Host", json!({"address": "10.2.2.3"}))),
        ("list", json!({"model_type_name": "Hosts"})),
    ] {
        let e = rig.err(method, p).await;
        assert_etcd_failed(method, &e, &rig.etcd.url, "");
    }
    // The service still answers what needs no etcd.
    assert!(rig.ok("list_store_handlers", json!([])).await.is_array());
}

/// A path for a TOML string.
fn toml_path(path: &std::path::Path) -> String {
    format!("\"{}\"", path.display())
}

/// An etcd error reply whose message says why TLS failed.
fn assert_tls_failed(method: &str, e: &Value, url: &str, why: &str) {
    assert_etcd_failed(method, e, url, why);
    let message = e["message"].as_str().unwrap_or_default();
    assert!(message.contains("due to TLS: "), "{method}: {e}");
}

/// etcd serving only TLS, with a certificate of a test CA: a handler
/// trusting that CA (`certificate_ca_path`) saves, reads and lists; one
/// trusting another CA is refused on every call, with the reason.
#[tokio::test(flavor = "multi_thread")]
async fn etcd_over_tls_trusts_the_configured_ca_only() {
    let other_ca = tempfile::tempdir().expect("temp dir");
    let made =
        std::process::Command::new(commissaire_e2e::workspace_root().join("scripts/tls-ca.sh"))
            .arg(other_ca.path())
            .status()
            .expect("run scripts/tls-ca.sh");
    assert!(made.success());
    let wrong = toml_path(&other_ca.path().join("ca.pem"));
    let mut rig = Rig::start_on(PrivateEtcd::start_with(EtcdTls::Server), |etcd| {
        let (url, ca) = (&etcd.url, toml_path(&etcd.tls_file("ca.pem")));
        format!(
            "{{ storage_handlers = [\
               {{ type = \"etcd\", name = \"st-tls\", server_url = \"{url}\", certificate_ca_path = {ca}, models = [\"Host*\"] }}, \
               {{ type = \"etcd\", name = \"st-wrong-ca\", server_url = \"{url}\", certificate_ca_path = {wrong}, models = [\"Cluster*\"] }}] }}"
        )
    })
    .await;
    assert!(rig.etcd.url.starts_with("https://"), "{}", rig.etcd.url);

    let saved = rig
        .ok(
            "save",
            params("Host", json!({"address": "10.7.7.7", "cpus": 2})),
        )
        .await;
    assert_eq!(saved["cpus"], 2);
    let (key, event) = rig.event().await;
    assert_eq!(key, "notify.storage.Host.created");
    assert_eq!(event["model"]["address"], "10.7.7.7");
    let got = rig
        .ok("get", params("Host", json!({"address": "10.7.7.7"})))
        .await;
    assert_eq!(got, saved);
    let listed = rig.ok("list", json!({"model_type_name": "Hosts"})).await;
    assert_eq!(listed, json!([saved]));

    for (method, p) in [
        ("save", params("Cluster", json!({"name": "st-tls-c"}))),
        ("get", params("Cluster", json!({"name": "st-tls-c"}))),
    ] {
        let e = rig.err(method, p).await;
        assert_tls_failed(
            method,
            &e,
            &rig.etcd.url,
            // BadSignature: both test CAs have the same name.
            "etcd's certificate is not from a CA of \"certificate_ca_path\"",
        );
    }
    // What went wrong on one handler left the other alone.
    rig.ok("delete", params("Host", json!({"address": "10.7.7.7"})))
        .await;
}

/// etcd requiring client certificates (`--client-cert-auth`): a handler
/// with `certificate_path` and `certificate_key_path` is let in; one with
/// the CA only is refused on its first call, with the reason, and the
/// service goes on serving the other.
#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_with_a_client_certificate_and_without() {
    let rig = Rig::start_on(PrivateEtcd::start_with(EtcdTls::Mutual), |etcd| {
        let url = &etcd.url;
        let (ca, cert, key) = (
            toml_path(&etcd.tls_file("ca.pem")),
            toml_path(&etcd.tls_file("client.pem")),
            toml_path(&etcd.tls_file("client.key")),
        );
        format!(
            "{{ storage_handlers = [\
               {{ type = \"etcd\", name = \"st-mtls\", server_url = \"{url}\", certificate_ca_path = {ca}, \
                  certificate_path = {cert}, certificate_key_path = {key}, models = [\"Host*\"] }}, \
               {{ type = \"etcd\", name = \"st-no-cert\", server_url = \"{url}\", certificate_ca_path = {ca}, models = [\"Cluster*\"] }}] }}"
        )
    })
    .await;

    let saved = rig
        .ok("save", params("Host", json!({"address": "10.8.8.8"})))
        .await;
    let got = rig
        .ok("get", params("Host", json!({"address": "10.8.8.8"})))
        .await;
    assert_eq!(got, saved);

    let e = rig
        .err("save", params("Cluster", json!({"name": "st-no-cert"})))
        .await;
    // etcd's alert, or the connection it closed when the request's write
    // came first (TLS 1.3): either way the message says what to set.
    assert_etcd_failed(
        "save",
        &e,
        &rig.etcd.url,
        "etcd asks for a client certificate: set \"certificate_path\" and \"certificate_key_path\"",
    );

    rig.ok("delete", params("Host", json!({"address": "10.8.8.8"})))
        .await;
}

/// A TLS file that is missing or not what its key says stops the
/// service's start: the host exits 1 with one line naming the key and the
/// path, and never a line of the key.
#[test]
fn bad_tls_files_stop_the_start_naming_the_key_and_the_path() {
    let certs = tempfile::tempdir().expect("temp dir");
    let made =
        std::process::Command::new(commissaire_e2e::workspace_root().join("scripts/tls-ca.sh"))
            .arg(certs.path())
            .status()
            .expect("run scripts/tls-ca.sh");
    assert!(made.success());
    let file = |name: &str| certs.path().join(name);
    let missing = file("missing.pem");
    let server_key = std::fs::read_to_string(file("server.key")).expect("server.key");
    for (files, expected) in [
        (
            format!("certificate_ca_path = {}", toml_path(&missing)),
            format!(
                "\"certificate_ca_path\" {}: cannot read it",
                missing.display()
            ),
        ),
        (
            format!("certificate_ca_path = {}", toml_path(&file("server.key"))),
            format!(
                "\"certificate_ca_path\" {}: holds no PEM certificate",
                file("server.key").display()
            ),
        ),
        (
            format!(
                "certificate_ca_path = {}, certificate_path = {}, certificate_key_path = {}",
                toml_path(&file("ca.pem")),
                toml_path(&file("client.pem")),
                toml_path(&file("server.key"))
            ),
            format!(
                "\"certificate_key_path\" {}: not a usable client certificate and key",
                file("server.key").display()
            ),
        ),
    ] {
        let queue = unique("st-storage");
        let spec = HostSpec {
            plugins: vec!["storage"],
            exchange: unique("st-ex"),
            ..HostSpec::amqp()
        };
        let exchange = spec.exchange.clone();
        let config = format!(
            "{{ storage_handlers = [{{ type = \"etcd\", server_url = \"https://127.0.0.1:1\", {files} }}] }}"
        );
        let mut host = TestHost::start_expecting_failure(spec, &storage_service(&queue, &config));
        let status = host.wait(Duration::from_secs(30));
        let log = host.stderr();
        cleanup_broker(&exchange, &[queue]);
        assert_eq!(status.code(), Some(1), "{log}");
        assert!(log.contains(&expected), "{expected}\n{log}");
        for line in server_key.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!log.contains(line), "a line of the key in the log:\n{log}");
        }
    }
}

/// The envelopes of wire.txt (the original's replies during Commissaire's
/// own end-to-end suite), replayed as they were sent, through lapin and
/// through kombu.
#[tokio::test(flavor = "multi_thread")]
async fn replay_the_captured_wire_samples() {
    let mut rig = Rig::start().await;
    // The lookup error: `get` of a missing Host, as a list, on an etcd
    // with clusters but no hosts (as in the original's suite).
    rig.ok("save", params("Cluster", json!({"name": "st-wire"})))
        .await;
    assert_eq!(rig.event().await.0, "notify.storage.Cluster.created");
    let request = r#"{"jsonrpc": "2.0", "id": "f46ac975-70bb-4847-844d-1dadd2a6477d", "method": "get", "params": {"model_type_name": "Host", "model_json_data": [{"address": "192.168.152.254", "status": "", "os": "", "cpus": 0, "memory": 0, "space": 0, "last_check": "", "source": ""}]}}"#;
    let reply = raw(&rig, "storage.get", request).await;
    let expected: Value = serde_json::from_str(r#"{"jsonrpc": "2.0", "id": "f46ac975-70bb-4847-844d-1dadd2a6477d", "error": {"code": -20000, "message": "(-20000) Key not found : /commissaire/hosts", "data": {"model_json_data": [{"address": "192.168.152.254", "status": "", "os": "", "cpus": 0, "memory": 0, "space": 0, "last_check": "", "source": ""}], "model_type_name": "Host"}}}"#).unwrap();
    assert_eq!(reply, expected);

    // The `get` sample, after the host it reads was stored.
    let stored = json!({"address": "192.168.152.110", "status": "active", "os": "fedora",
                        "cpus": 1, "memory": 1234, "space": 12345, "last_check": "", "source": ""});
    rig.ok("save", params("Host", json!([stored]))).await;
    assert_eq!(rig.event().await.0, "notify.storage.Host.created");
    let request = r#"{"jsonrpc": "2.0", "id": "5aaaeb73-24da-48dd-9cd2-01298cc6cef7", "method": "get", "params": {"model_type_name": "Host", "model_json_data": {"address": "192.168.152.110", "status": "", "os": "", "cpus": 0, "memory": 0, "space": 0, "last_check": "", "source": ""}}}"#;
    let reply = raw(&rig, "storage.get", request).await;
    let expected: Value = serde_json::from_str(r#"{"jsonrpc": "2.0", "id": "5aaaeb73-24da-48dd-9cd2-01298cc6cef7", "result": {"address": "192.168.152.110", "status": "active", "os": "fedora", "cpus": 1, "memory": 1234, "space": 12345, "last_check": "", "source": ""}}"#).unwrap();
    assert_eq!(reply, expected);

    // The `deleted` notification sample.
    let request = r#"{"jsonrpc": "2.0", "id": "st-del", "method": "delete", "params": {"model_type_name": "Host", "model_json_data": {"address": "192.168.152.110"}}}"#;
    assert_eq!(
        raw(&rig, "storage.delete", request).await["result"],
        Value::Null
    );
    // Byte for byte the original's body (kombu's `json.dumps`: this key
    // order, this spacing), with its properties: JSON, transient, no
    // reply queue.
    let delivery = rig.delivery().await;
    assert_eq!(delivery.routing_key.as_str(), "notify.storage.Host.deleted");
    assert_eq!(
        String::from_utf8_lossy(&delivery.data),
        r#"{"event": "deleted", "class": "Host", "model": {"address": "192.168.152.110", "status": "active", "os": "fedora", "cpus": 1, "memory": 1234, "space": 12345, "last_check": "", "source": ""}}"#
    );
    let props = &delivery.properties;
    assert_eq!(
        props.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(*props.delivery_mode(), Some(1));
    assert_eq!(*props.reply_to(), None);

    // The -32600 sample (`list` of Clusters after the suite's clean-up
    // deleted the clusters directory) is where the plugin differs on
    // purpose: an empty list.
    ureq::delete(&format!(
        "{}/v2/keys/commissaire/clusters?recursive=true",
        rig.etcd.url
    ))
    .call()
    .expect("delete the clusters directory");
    let request = r#"{"jsonrpc": "2.0", "id": "1d736ace-968b-4f2b-9807-cc738b801992", "method": "list", "params": {"model_type_name": "Clusters"}}"#;
    let reply = raw(&rig, "storage.list", request).await;
    assert_eq!(
        reply,
        json!({"jsonrpc": "2.0", "id": "1d736ace-968b-4f2b-9807-cc738b801992", "result": []})
    );
}

/// The reply to `body` sent as captured, through lapin byte for byte and
/// through kombu as Commissaire's `BusMixin.request` publishes (the
/// replies must agree).
async fn raw(rig: &Rig, routing_key: &str, body: &str) -> Value {
    let reply = rig
        .caller
        .call(routing_key, body.as_bytes(), ReplyQueue::AutoDelete, None)
        .await
        .body;
    if !body.contains("\"method\": \"delete\"") {
        assert_eq!(
            kombu(rig, routing_key, body),
            reply,
            "{routing_key} via kombu"
        );
    }
    reply
}

/// The reply to `body` published by kombu (tests/python/commissaire_request.py).
fn kombu(rig: &Rig, routing_key: &str, body: &str) -> Value {
    let script = commissaire_e2e::workspace_root().join("tests/python/commissaire_request.py");
    let output = std::process::Command::new(commissaire_e2e::python_with_kombu())
        .arg(&script)
        .arg(&rig.host.spec.bus_uri)
        .arg(&rig.host.spec.exchange)
        .arg(routing_key)
        .args(["unused", "null", "--raw-body", body])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{routing_key} via kombu: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("kombu's reply is JSON")
}

/// Secret models go to custodia (over its Unix socket), never to etcd,
/// and announce nothing.
#[tokio::test(flavor = "multi_thread")]
async fn host_creds_are_kept_in_custodia() {
    let mut custodia = PrivateCustodia::start();
    let socket = custodia.socket.display().to_string();
    let config_socket = socket.clone();
    let mut rig = Rig::start_with(move |url| {
        format!(
            "{{ custodia_socket_path = \"{config_socket}\", storage_handlers = [{{ type = \"etcd\", server_url = \"{url}\" }}] }}"
        )
    })
    .await;
    let full = json!({"address": "10.3.3.3", "ssh_priv_key": "c2VjcmV0", "remote_user": "root"});
    let saved = rig
        .ok(
            "save",
            params(
                "HostCreds",
                json!({"address": "10.3.3.3", "ssh_priv_key": "c2VjcmV0"}),
            ),
        )
        .await;
    assert_eq!(saved, full);
    let only_key = params("HostCreds", json!({"address": "10.3.3.3"}));
    assert_eq!(rig.ok("get", only_key.clone()).await, full);
    // Saved again: custodia refuses to overwrite (409), and the original
    // passed that on; so does the plugin, and the secret is unchanged.
    let mut changed = full.clone();
    changed["remote_user"] = json!("st-admin");
    let e = rig.err("save", params("HostCreds", changed)).await;
    assert_eq!(e["code"], -32600, "{e}");
    assert_eq!(
        e["data"]["exception"],
        "<class 'requests.exceptions.HTTPError'>"
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("409 Client Error: Conflict for url: http+unix://"),
        "{e}"
    );
    assert_eq!(rig.ok("get", only_key.clone()).await, full);
    // Not in etcd.
    let in_etcd = ureq::get(&format!(
        "{}/v2/keys/commissaire/hosts/10.3.3.3",
        rig.etcd.url
    ))
    .call();
    assert!(
        matches!(in_etcd, Err(ureq::Error::StatusCode(404))),
        "{in_etcd:?}"
    );

    assert_eq!(rig.ok("delete", only_key.clone()).await, Value::Null);
    let e = rig.err("get", only_key.clone()).await;
    let url = format!(
        "http+unix://{}/secrets/hosts/10.3.3.3",
        socket.replace('/', "%2F")
    );
    assert_eq!(
        e,
        json!({"code": -20000,
               "message": format!("(-20000) 404 Client Error: Not Found for url: {url}"),
               "data": {"model_type_name": "HostCreds",
                        "model_json_data": [{"address": "10.3.3.3", "ssh_priv_key": "", "remote_user": "root"}]}})
    );
    assert_eq!(rig.err("delete", only_key.clone()).await["code"], -20000);

    // No notification came for the secrets: the first one is this.
    rig.ok("save", params("Cluster", json!({"name": "st-after-creds"})))
        .await;
    assert_eq!(rig.event().await.0, "notify.storage.Cluster.created");

    custodia.stop();
    let e = rig.err("get", only_key).await;
    assert_eq!(e["code"], -32600, "{e}");
    assert_eq!(
        e["data"]["exception"],
        "<class 'requests.exceptions.ConnectionError'>"
    );
    assert!(
        e["message"].as_str().unwrap_or_default().contains(&socket),
        "{e}"
    );
}
