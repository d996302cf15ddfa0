//! Direct ext_authz load without Envoy: N HTTP/2 connections, M requests in flight on each, for a fixed
//! time, with CheckRequests shaped like Envoy's. Prints one JSON line: Check/s, outcomes and latency
//! percentiles (microseconds, from an HDR histogram). Used by `bench/run`.
//!
//! `check_load --target 127.0.0.1:9001 --requests requests.tsv --connections 2 --concurrency 32 --duration 10`
//! `check_load --target 127.0.0.1:9001 --probe-access-log` exits 0 when the server runs the access-log
//! service, 3 when it answers UNIMPLEMENTED. `--write-frame FILE` writes the request as a gRPC frame for
//! `h2load -d FILE` (the cheapest client there is, for the highest Check/s).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use hdrhistogram::Histogram;
use prost::Message as _;
use tonic::transport::{Channel, Endpoint};

/// Direct gRPC Check load for an ext_authz server.
#[derive(Parser)]
struct Args {
    /// host:port of the ext_authz server.
    #[arg(long)]
    target: String,
    /// Requests to send, round-robin: lines of `key<TAB>api<TAB>path` (bench/gen_catalog.py --requests).
    #[arg(long, conflicts_with_all = ["key", "api", "path"])]
    requests: Option<PathBuf>,
    /// A single API key (instead of --requests).
    #[arg(long, default_value = "")]
    key: String,
    /// The route's API id (the `tollgate_api` context extension).
    #[arg(long, default_value = "benchapi")]
    api: String,
    /// The request path, query included.
    #[arg(long, default_value = "/v1/bench/item/42?q=1")]
    path: String,
    /// The HTTP method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Tokio worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// A label copied into the JSON output.
    #[arg(long, default_value = "")]
    label: String,
    /// Only ask whether the server runs envoy.service.accesslog.v3.AccessLogService.
    #[arg(long)]
    probe_access_log: bool,
    /// Only write the first request as a gRPC message frame to this file (a request body for h2load).
    #[arg(long, value_name = "FILE")]
    write_frame: Option<PathBuf>,
}

/// What one worker saw.
struct Tally {
    histogram: Histogram<u64>,
    ok: u64,
    denied: u64,
    errors: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("check_load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("check_load: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if let Some(file) = &args.write_frame {
        let requests = load_requests(&args)?;
        let message = requests[0].encode_to_vec(); // invariant: load_requests never returns an empty list
        let mut frame = Vec::with_capacity(message.len() + 5);
        frame.push(0);
        frame.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
        frame.extend_from_slice(&message);
        std::fs::write(file, frame).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let endpoint = Endpoint::from_shared(format!("http://{}", args.target))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2));
    if args.probe_access_log {
        return probe_access_log(endpoint.connect().await?).await;
    }
    let requests = std::sync::Arc::new(load_requests(&args)?);
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections.max(1) {
        channels.push(endpoint.connect().await?);
    }
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let mut workers = Vec::new();
    let total_workers = channels.len() * args.concurrency.max(1);
    for (c, channel) in channels.iter().enumerate() {
        for w in 0..args.concurrency.max(1) {
            let client = AuthorizationClient::new(channel.clone());
            let requests = requests.clone();
            let first = c * args.concurrency.max(1) + w;
            workers.push(tokio::spawn(worker(
                client,
                requests,
                first,
                total_workers,
                measure_from,
                end,
            )));
        }
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut ok, mut denied, mut errors) = (0u64, 0u64, 0u64);
    for w in workers {
        let t = w.await??;
        histogram.add(&t.histogram)?;
        ok += t.ok;
        denied += t.denied;
        errors += t.errors;
    }
    let seconds = args.duration;
    let checks = ok + denied + errors;
    println!(
        "{{\"label\":\"{}\",\"checks\":{checks},\"seconds\":{seconds},\"rate\":{:.1},\"ok\":{ok},\"denied\":{denied},\
         \"errors\":{errors},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\
         \"connections\":{},\"concurrency\":{}}}",
        args.label.replace('"', "'"),
        checks as f64 / seconds,
        histogram.value_at_quantile(0.50),
        histogram.value_at_quantile(0.90),
        histogram.value_at_quantile(0.99),
        histogram.value_at_quantile(0.999),
        histogram.max(),
        channels.len(),
        args.concurrency.max(1),
    );
    Ok(if ok == 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

async fn worker(
    mut client: AuthorizationClient<Channel>,
    requests: std::sync::Arc<Vec<CheckRequest>>,
    first: usize,
    step: usize,
    measure_from: Instant,
    end: Instant,
) -> Result<Tally, hdrhistogram::CreationError> {
    let mut tally = Tally {
        histogram: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        ok: 0,
        denied: 0,
        errors: 0,
    };
    let mut next = first;
    loop {
        let request = requests[next % requests.len()].clone();
        next = next.wrapping_add(step);
        let sent = Instant::now();
        if sent >= end {
            return Ok(tally);
        }
        let answer = client.check(request).await;
        let done = Instant::now();
        if sent < measure_from {
            continue;
        }
        let micros = u64::try_from(done.duration_since(sent).as_micros()).unwrap_or(u64::MAX);
        tally.histogram.saturating_record(micros.max(1));
        match answer {
            Ok(response) => {
                let code = response.get_ref().status.as_ref().map_or(0, |s| s.code);
                if code == 0 {
                    tally.ok += 1;
                } else {
                    tally.denied += 1;
                }
            }
            Err(_) => tally.errors += 1,
        }
    }
}

/// CheckRequests shaped like the ones Envoy 1.40 sends for a plain HTTP/1.1 GET.
fn load_requests(args: &Args) -> Result<Vec<CheckRequest>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    match &args.requests {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let mut cols = line.split('\t');
                let (Some(key), Some(api), Some(path)) = (cols.next(), cols.next(), cols.next())
                else {
                    return Err(format!("{}: expected key<TAB>api<TAB>path", file.display()).into());
                };
                out.push(check_request(&args.method, key, api, path, out.len()));
            }
        }
        None => out.push(check_request(
            &args.method,
            &args.key,
            &args.api,
            &args.path,
            0,
        )),
    }
    if out.is_empty() {
        return Err("no requests to send".into());
    }
    Ok(out)
}

fn check_request(method: &str, key: &str, api: &str, path: &str, n: usize) -> CheckRequest {
    let authority = "bench.example.test";
    let mut headers: HashMap<String, String> = [
        (":authority", authority),
        (":method", method),
        (":path", path),
        (":scheme", "http"),
        ("user-agent", "wrk"),
        ("accept", "*/*"),
        ("x-forwarded-proto", "http"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    headers.insert(
        "x-request-id".to_owned(),
        format!("4f6c1f0e-0000-4000-8000-{n:012}"),
    );
    if !key.is_empty() {
        headers.insert("x-api-key".to_owned(), key.to_owned());
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    id: n.to_string(),
                    method: method.to_owned(),
                    headers,
                    path: path.to_owned(),
                    host: authority.to_owned(),
                    scheme: "http".to_owned(),
                    protocol: "HTTP/1.1".to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: HashMap::from([("tollgate_api".to_owned(), api.to_owned())]),
            ..Default::default()
        }),
    }
}

async fn probe_access_log(channel: Channel) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut client = AccessLogServiceClient::new(channel);
    let empty = tonic::codegen::tokio_stream::empty();
    match client.stream_access_logs(empty).await {
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            println!("access-log service: not available");
            Ok(ExitCode::from(3))
        }
        _ => {
            println!("access-log service: available");
            Ok(ExitCode::SUCCESS)
        }
    }
}
