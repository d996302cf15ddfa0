//! A raw HTTP/1.1 client: sends the request target byte for byte, because reqwest and `url` normalise
//! `..`, backslashes and percent-encodings away before the request leaves.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A response read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    /// The status code; 0 when the server closed the connection without answering.
    pub status: u16,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Sends `METHOD target HTTP/1.1` with `host` and `headers` to 127.0.0.1:`port` on a fresh connection
/// (`Connection: close`) and reads the whole answer. Blocking, with 10 s socket timeouts.
pub fn raw_request(
    port: u16,
    method: &str,
    target: &[u8],
    host: &str,
    headers: &[(&str, &str)],
) -> RawResponse {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect for a raw request");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set_read_timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .expect("set_write_timeout");
    let mut request = Vec::new();
    request.extend_from_slice(method.as_bytes());
    request.push(b' ');
    request.extend_from_slice(target);
    request.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    request.extend_from_slice(host.as_bytes());
    request.extend_from_slice(b"\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    stream.write_all(&request).expect("write a raw request");
    let mut answer = Vec::new();
    // A reset after a complete answer is fine; whatever arrived is parsed below.
    let _ = stream.read_to_end(&mut answer);
    parse_response(&answer)
}

fn parse_response(answer: &[u8]) -> RawResponse {
    let Some(head_end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return RawResponse {
            status: 0,
            headers: Vec::new(),
            body: answer.to_vec(),
        };
    };
    let head = String::from_utf8_lossy(&answer[..head_end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let raw_body = &answer[head_end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(raw_body)
    } else {
        raw_body.to_vec()
    };
    RawResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            break;
        };
        data = &data[line_end + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        body.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or(&[]);
    }
    body
}
