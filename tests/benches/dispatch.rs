//! What crossing the plugin ABI costs: `add [1,2]` through the loaded
//! `libsimple.so` versus the same exported entry point linked in-process
//! (the test kit's path).
//!
//! `cargo bench -p commissaire-e2e --bench dispatch`

use std::hint::black_box;
use std::time::Duration;

use commissaire_e2e::{release_library, RoutingBus};
use commissaire_host::bus::Incoming;
use commissaire_host::dispatch::Service;
use commissaire_host::plugin::PluginLibrary;
use commissaire_plugin_api::host::{HostBus, RequestMeta};
use commissaire_plugin_api::testing::TestService;
use commissaire_plugin_api::RpcError;
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;

struct NoBus;

impl HostBus for NoBus {
    fn request(
        &self,
        _: &RequestMeta<'_>,
        _: &str,
        _: &str,
        _: Option<Duration>,
    ) -> Result<String, RpcError> {
        Err(RpcError::internal_error("no bus"))
    }
    fn notify(&self, _: &RequestMeta<'_>, _: &str, _: &str) -> Result<(), RpcError> {
        Ok(())
    }
    fn respond(&self, _: &RequestMeta<'_>, _: &str, _: &str, _: &str) -> Result<(), RpcError> {
        Ok(())
    }
}

fn meta() -> RequestMeta<'static> {
    RequestMeta {
        exchange: "commissaire",
        routing_key: "simple.add",
        method: "add",
        id_json: "\"b\"",
        reply_to: Some("reply"),
        correlation_id: None,
        redelivered: false,
        traceparent: None,
        deadline: None,
    }
}

fn bench(c: &mut Criterion) {
    let path = release_library("commissaire-plugin-simple", "simple");
    let library = PluginLibrary::load(&path).expect("libsimple.so loads");
    let instance = library.instantiate(&json!({})).expect("simple starts");
    let direct = TestService::<simple::Simple>::new();
    let mut group = c.benchmark_group("add [1,2]");
    group.bench_function("in-process dispatch", |b| {
        b.iter(|| black_box(direct.call_raw(black_box("add"), black_box("[1,2]"), Some("reply"))))
    });
    group.bench_function("through the plugin ABI", |b| {
        b.iter(|| black_box(instance.call(meta(), &NoBus, black_box("[1,2]"))))
    });
    group.finish();

    let service = Service::start(library, &json!({})).expect("simple starts");
    let bus = RoutingBus::default();
    let body = br#"{"jsonrpc":"2.0","id":"6f1c","method":"add","params":[1,2]}"#;
    let delivery = Incoming {
        exchange: "commissaire".to_owned(),
        routing_key: "simple.add".to_owned(),
        body: body.to_vec(),
        reply_to: Some("reply".to_owned()),
        correlation_id: None,
        malformed: None,
        traceparent: None,
        redelivered: false,
        deadline: None,
        settlement: None,
    };
    c.bench_function("whole request: parse, call, reply body", |b| {
        b.iter(|| black_box(service.handle(black_box(&delivery), None, &bus)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
