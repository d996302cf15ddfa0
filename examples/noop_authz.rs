//! The floor for any external authorizer: an ext_authz server that allows everything and an access-log
//! service that reads and drops every entry. `bench/run` puts it behind Envoy exactly where tollgate goes.
//!
//! `noop_authz 127.0.0.1:PORT [WORKER_THREADS] [--rich[=PARTS]]` (port 0 picks one; the bound address is printed
//! on stdout). `--rich` answers with a fixed response shaped like tollgate's allow to the bench request: what
//! Envoy pays for the answer's content, apart from what computing it costs (`bench/run` variant 8). PARTS, comma
//! separated, picks some of it: `metadata` (9 fields), `upstream` (3 `x-tollgate-*` headers), `remove` (the key
//! header), `response` (3 `ratelimit-*` headers); plain `--rich` is all four.

use std::net::SocketAddr;

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, HeaderAppendAction,
    HeaderValue, HeaderValueOption, HttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::{
    AccessLogService, AccessLogServiceServer,
};
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone)]
struct Noop {
    answer: CheckResponse,
}

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(&self, _: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(self.answer.clone()))
    }
}

/// The parts of tollgate's allow that `--rich` puts in the answer.
#[derive(Clone, Copy, Default)]
struct Parts {
    metadata: bool,
    upstream: bool,
    remove: bool,
    response: bool,
}

impl Parts {
    fn parse(arg: &str) -> Result<Parts, String> {
        let all = Parts {
            metadata: true,
            upstream: true,
            remove: true,
            response: true,
        };
        let Some(list) = arg.strip_prefix("--rich") else {
            return Ok(Parts::default());
        };
        let Some(list) = list.strip_prefix('=') else {
            return if list.is_empty() {
                Ok(all)
            } else {
                Err(format!("unknown option {arg}"))
            };
        };
        let mut parts = Parts::default();
        for part in list.split(',') {
            match part {
                "metadata" => parts.metadata = true,
                "upstream" => parts.upstream = true,
                "remove" => parts.remove = true,
                "response" => parts.response = true,
                other => {
                    return Err(format!(
                        "unknown part {other} (metadata, upstream, remove, response)"
                    ));
                }
            }
        }
        Ok(parts)
    }
}

fn answer(parts: Parts) -> CheckResponse {
    let header = |key: &str, value: &str| HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            raw_value: Vec::new(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    };
    let mut ok = OkHttpResponse::default();
    if parts.upstream {
        ok.headers = vec![
            header("x-tollgate-app", "app000000"),
            header("x-tollgate-developer", "dev0@bench.example"),
            header("x-tollgate-product", "p00019"),
        ];
    }
    if parts.remove {
        ok.headers_to_remove = vec!["x-api-key".to_owned()];
    }
    if parts.response {
        ok.response_headers_to_add = vec![
            header("ratelimit-limit", "1000000000000"),
            header("ratelimit-remaining", "999999999999"),
            header("ratelimit-reset", "36000"),
        ];
    }
    let metadata = parts.metadata.then(|| {
        let fields = [
            ("decision", "allow"),
            ("reason", "allowed"),
            ("app", "app000000"),
            ("developer", "dev0@bench.example"),
            ("company", "company0"),
            ("product", "p00019"),
            ("operation", "api19 GET /v1/p19/r9/**"),
            ("api", "api19"),
            ("environment", "bench"),
        ]
        .into_iter()
        .map(|(k, v)| {
            let value = Value {
                kind: Some(Kind::StringValue(v.to_owned())),
            };
            (k.to_owned(), value)
        })
        .collect();
        Struct { fields }
    });
    CheckResponse {
        status: Some(rpc::Status {
            code: rpc::Code::Ok as i32,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(ok)),
        dynamic_metadata: metadata,
    }
}

#[tonic::async_trait]
impl AccessLogService for Noop {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let mut stream = request.into_inner();
        while stream.message().await?.is_some() {}
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut parts = Parts::default();
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        parts = Parts::parse(arg)?;
    }
    let mut positional = args.iter().filter(|a| !a.starts_with("--"));
    let addr: SocketAddr = positional
        .next()
        .ok_or("usage: noop_authz 127.0.0.1:PORT [WORKER_THREADS] [--rich[=PARTS]]")?
        .parse()?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = positional.next() {
        runtime.worker_threads(threads.parse()?);
    }
    let noop = Noop {
        answer: answer(parts),
    };
    runtime.enable_all().build()?.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        println!("{}", listener.local_addr()?);
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(noop.clone()))
            .add_service(AccessLogServiceServer::new(noop))
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
            .await?;
        Ok(())
    })
}
