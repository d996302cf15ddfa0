//! A fast fake LLM for `bench/run --phases genai`: every request on every path gets the same server-sent-event
//! stream, `transfer-encoding: chunked`, one chunk per event, each event written to the socket on its own (as an
//! LLM streams them), then the last chunk. The events come from a JSON file (an array of strings) that
//! `bench/run` writes with `examples/quickstart/upstream.py`'s own event generator, so the bytes are exactly the
//! quickstart fake LLM's; this server only makes them cheap to serve (one thread, no parsing beyond the request
//! head), so the upstream is not what a benchmark measures.
//!
//! `sse_upstream 127.0.0.1:PORT EVENTS_JSON [--gap-ms N]` (port 0 picks one; the bound address is printed on
//! stdout). `--gap-ms N` pauses N ms before each event, like a model generating tokens (default 0: back to back).
//! HTTP/1.1 keep-alive; request bodies (content-length) are read and dropped.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
transfer-encoding: chunked\r\n\r\n";

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: sse_upstream ADDR EVENTS_JSON [--gap-ms N]"))?
        .parse()?;
    let file = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: sse_upstream ADDR EVENTS_JSON [--gap-ms N]"))?;
    let mut gap = Duration::ZERO;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--gap-ms" => {
                let ms: u64 = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--gap-ms needs a value"))?
                    .parse()?;
                gap = Duration::from_millis(ms);
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let events: Vec<String> = serde_json::from_slice(&std::fs::read(&file)?)?;
    // Each event as its own chunk of the chunked encoding, framed once here.
    let frames: Vec<Vec<u8>> = events
        .iter()
        .map(|e| {
            let mut f = format!("{:x}\r\n", e.len()).into_bytes();
            f.extend_from_slice(e.as_bytes());
            f.extend_from_slice(b"\r\n");
            f
        })
        .collect();
    let frames: &'static [Vec<u8>] = Box::leak(frames.into_boxed_slice());
    let listener = TcpListener::bind(addr).await?;
    println!("{}", listener.local_addr()?);
    loop {
        let (sock, _) = listener.accept().await?;
        sock.set_nodelay(true)?;
        tokio::spawn(async move {
            let _ = serve(sock, frames, gap).await;
        });
    }
}

/// Answers every request of one keep-alive connection with the stream.
async fn serve(mut sock: TcpStream, frames: &[Vec<u8>], gap: Duration) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // The request head, then as many body bytes as content-length says.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let body = content_length(&buf[..end]);
        while buf.len() < end + body {
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..end + body);
        sock.write_all(HEAD).await?;
        for frame in frames {
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            sock.write_all(frame).await?;
        }
        sock.write_all(b"0\r\n\r\n").await?;
    }
}

fn content_length(head: &[u8]) -> usize {
    let text = String::from_utf8_lossy(head);
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}
