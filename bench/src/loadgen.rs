//! Closed-loop load generator: keeps `--concurrency` requests in flight
//! through one reply queue (correlation by id), warms up, then measures
//! `--requests` calls of `simple.add` and checks every result (or of any
//! method with `--params`, checking that each answers a result).
//!
//! `cargo run --release -p commissaire-bench --bin loadgen -- --concurrency 32`

#![allow(clippy::print_stdout)] // the report is this program's output

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use commissaire_host::bus::ReplyQueueKind;
use commissaire_host::client::RpcClient;

#[derive(Debug, Parser)]
struct Args {
    /// The bus.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    bus_uri: String,
    /// The exchange.
    #[arg(long, default_value = "commissaire")]
    exchange: String,
    /// The routing key to call; params are `[i, 1]` and the result must be
    /// `i + 1` (for `wordy_add`, the sentence saying so), unless `--params`.
    #[arg(long, default_value = "simple.add")]
    routing_key: String,
    /// The params of every request instead, as JSON text in which `{i}`
    /// stands for the request's number modulo `--keys`; any result is
    /// right, an error is not.
    #[arg(long)]
    params: Option<String>,
    /// What `{i}` in `--params` counts up to.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Measured requests.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Unmeasured requests first.
    #[arg(long, default_value_t = 2_000)]
    warmup: usize,
    /// Where replies come back: `named` (a queue of its own, the default)
    /// or `direct` (RabbitMQ's direct reply-to).
    #[arg(long, default_value = "named", value_parser = reply_queue_kind)]
    reply_queue: ReplyQueueKind,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
}

fn reply_queue_kind(text: &str) -> Result<ReplyQueueKind, String> {
    match text {
        "named" => Ok(ReplyQueueKind::Named),
        "direct" => Ok(ReplyQueueKind::Direct),
        other => Err(format!("`{other}`: expected `named` or `direct`")),
    }
}

async fn run_window(client: &Arc<RpcClient>, args: &Args, count: usize) -> (Vec<Duration>, usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let client = client.clone();
        let next = next.clone();
        let routing_key = args.routing_key.clone();
        let template = args.params.clone();
        let keys = args.keys.max(1);
        workers.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let params = match &template {
                    Some(t) => t.replace("{i}", &(i % keys).to_string()),
                    None => format!("[{i},1]"),
                };
                let started = Instant::now();
                let reply = client
                    .request(&routing_key, Some(&params), None, None)
                    .await;
                latencies.push(started.elapsed());
                let expected = if template.is_some() {
                    None
                } else if routing_key.ends_with(".wordy_add") {
                    Some(format!("\"Adding {i} plus 1 results in {}\"", i + 1))
                } else {
                    Some((i + 1).to_string())
                };
                match (reply, expected) {
                    (Ok(Ok(_)), None) => {}
                    (Ok(Ok(result)), Some(expected)) if result.get() == expected => {}
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        });
    }
    let mut all = Vec::with_capacity(count);
    let mut errors = 0;
    while let Some(done) = workers.join_next().await {
        if let Ok((l, e)) = done {
            all.extend(l);
            errors += e;
        }
    }
    (all, errors)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let bus = commissaire_host::bus::connect(&args.bus_uri).await?;
        let client = RpcClient::start(
            bus,
            &args.exchange,
            Duration::from_secs(10),
            args.reply_queue,
        )
        .await
        .context("reply queue")?;
        run_window(&client, &args, args.warmup).await;
        let started = Instant::now();
        let (mut latencies, errors) = run_window(&client, &args, args.requests).await;
        let elapsed = started.elapsed();
        client.bus().close().await;
        latencies.sort_unstable();
        let rate = args.requests as f64 / elapsed.as_secs_f64();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let (p50, p90, p99) = (
            percentile(&latencies, 50.0),
            percentile(&latencies, 90.0),
            percentile(&latencies, 99.0),
        );
        let max = latencies.last().copied().unwrap_or_default();
        if args.json {
            println!(
                "{}",
                serde_json::json!({"concurrency": args.concurrency, "requests": args.requests,
                    "rps": rate, "p50_ms": ms(p50), "p90_ms": ms(p90), "p99_ms": ms(p99),
                    "max_ms": ms(max), "errors": errors})
            );
        } else {
            println!(
                "c={:<3} n={} {:>8.0} req/s  p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms  errors {}",
                args.concurrency, args.requests, rate, ms(p50), ms(p90), ms(p99), ms(max), errors
            );
        }
        anyhow::ensure!(errors == 0, "{errors} requests failed or had a wrong result");
        Ok(())
    })
}
