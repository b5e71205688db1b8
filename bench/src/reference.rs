//! The reference: the least code that serves `simple.add` per docs/protocol.md
//! with lapin (topic exchange, durable queue, prefetch, reply to `reply_to`
//! through the default exchange with `correlation_id` copied, ack after the
//! reply). What the host is measured against.
//!
//! `cargo run --release -p commissaire-bench --bin reference -- --exchange bench`

use anyhow::Context as _;
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
struct Args {
    /// The bus.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    bus_uri: String,
    /// The exchange.
    #[arg(long, default_value = "commissaire")]
    exchange: String,
    /// The queue (bound with `simple.*`).
    #[arg(long, default_value = "simple")]
    queue: String,
    /// basic.qos prefetch.
    #[arg(long, default_value_t = 64)]
    prefetch: u16,
}

fn answer(body: &[u8]) -> Vec<u8> {
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let params = request.get("params").and_then(Value::as_array);
    let reply = match params.map(|p| {
        (
            p.first().and_then(Value::as_i64),
            p.get(1).and_then(Value::as_i64),
        )
    }) {
        Some((Some(x), Some(y))) => json!({"jsonrpc": "2.0", "id": id, "result": x + y}),
        _ => {
            json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32602, "message": "invalid params"}})
        }
    };
    reply.to_string().into_bytes()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let conn = Connection::connect(&args.bus_uri, ConnectionProperties::default())
        .await
        .context("connect")?;
    let channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            args.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            args.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            args.queue.as_str().into(),
            args.exchange.as_str().into(),
            "simple.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            args.queue.as_str().into(),
            "reference".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    eprintln!("reference: ready");
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let channel = channel.clone();
        tokio::spawn(async move {
            let reply = answer(&delivery.data);
            if let Some(reply_to) = delivery.properties.reply_to() {
                let mut properties =
                    BasicProperties::default().with_content_type("application/json".into());
                if let Some(c) = delivery.properties.correlation_id() {
                    properties = properties.with_correlation_id(c.clone());
                }
                let published = channel
                    .basic_publish(
                        "".into(),
                        reply_to.clone(),
                        BasicPublishOptions::default(),
                        &reply,
                        properties,
                    )
                    .await;
                if published.is_err() {
                    return;
                }
            }
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        });
    }
    Ok(())
}
