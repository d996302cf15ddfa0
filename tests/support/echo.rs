//! An in-process HTTP/1.1 upstream that records every request and answers with a JSON echo of it: 200, or
//! the status an `x-echo-status` request header asks for; an `x-echo-tokens: N` request header comes back as
//! an `x-tokens: N` response header (what a metered upstream reports).

use std::convert::Infallible;
use std::net::TcpListener as StdTcpListener;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The request target exactly as sent: path and query, undecoded.
    pub path_and_query: String,
    /// Every header (lowercase names) in arrival order; repeated headers appear repeatedly.
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The path without its query string.
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query.as_str(), |(p, _)| p)
    }

    /// The raw query string, if any.
    pub fn query(&self) -> Option<&str> {
        self.path_and_query.split_once('?').map(|(_, q)| q)
    }
}

/// The echo upstream; runs on its own thread and runtime so a test's blocking calls cannot stall it.
pub struct EchoUpstream {
    /// The loopback port it listens on.
    pub port: u16,
    requests: Arc<Mutex<Vec<Recorded>>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EchoUpstream {
    /// Binds a free loopback port and starts serving.
    pub fn start() -> EchoUpstream {
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind echo upstream");
        listener.set_nonblocking(true).expect("set_nonblocking");
        let port = listener.local_addr().expect("local_addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = oneshot::channel();
        let recorded = Arc::clone(&requests);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("echo upstream runtime");
            runtime.block_on(serve(listener, recorded, rx));
        });
        EchoUpstream {
            port,
            requests,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("echo requests lock").clone()
    }

    /// How many requests arrived so far.
    pub fn count(&self) -> usize {
        self.requests.lock().expect("echo requests lock").len()
    }

    /// The requests whose path (without query) is `path`.
    pub fn with_path(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path() == path)
            .collect()
    }

    /// The most recent request.
    pub fn last(&self) -> Option<Recorded> {
        self.requests().pop()
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: StdTcpListener,
    requests: Arc<Mutex<Vec<Recorded>>>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let requests = Arc::clone(&requests);
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(req, Arc::clone(&requests)));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

async fn answer(
    req: Request<Incoming>,
    requests: Arc<Mutex<Vec<Recorded>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body_len = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let recorded = Recorded {
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.to_string(), |pq| pq.as_str().to_owned()),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    let status = recorded
        .header("x-echo-status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut headers = serde_json::Map::new();
    for (name, value) in &recorded.headers {
        let entry = headers
            .entry(name.clone())
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if let serde_json::Value::Array(values) = entry {
            values.push(serde_json::Value::String(value.clone()));
        }
    }
    let echo = serde_json::json!({
        "method": recorded.method,
        "path": recorded.path_and_query,
        "headers": headers,
        "body_bytes": body_len,
    });
    // A metered upstream (a GenAI API, say) reports what a call consumed in a response header.
    let tokens = recorded.header("x-echo-tokens").map(str::to_owned);
    requests.lock().expect("echo requests lock").push(recorded);
    let mut response = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if let Some(tokens) = tokens {
        response = response.header("x-tokens", tokens);
    }
    let response = response
        .body(Full::new(Bytes::from(echo.to_string())))
        .expect("echo response");
    Ok(response)
}
