//! A small Stripe client for the Billing meter endpoints: form-encoded v1, JSON v2, bearer auth, the pinned
//! `Stripe-Version`, `Idempotency-Key`; and what each answer means for delivery.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use serde::Deserialize;

use super::BillingError;
use super::config::StripeConfig;
use crate::metering::OutboxRow;

/// The text Stripe answers a meter event whose identifier it has seen (counts as delivered).
pub const DUPLICATE_MESSAGE: &str = "An event already exists with identifier";

/// What one Stripe answer means for the row (or batch) it was about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Stripe took the event.
    Accepted,
    /// Stripe already holds an event with this identifier: delivered earlier.
    Duplicate,
    /// Try again later; `new_key` after a 5xx, whose answer Stripe caches under the Idempotency-Key.
    Retry {
        /// Short cause for logs and metrics.
        reason: String,
        /// What `Retry-After` asked for.
        retry_after: Option<Duration>,
        /// Use a fresh Idempotency-Key next time.
        new_key: bool,
    },
    /// 401/403: the key is wrong or lacks rights; delivery pauses.
    Unauthorized {
        /// HTTP status.
        status: u16,
    },
    /// The v2 session token expired: get a new session and send again.
    SessionExpired,
    /// Stripe refuses the event for good: dead-letter it with the reason.
    Rejected {
        /// HTTP status.
        status: u16,
        /// Stripe's message.
        message: String,
    },
}

/// Classifies a v1 answer from its status, `Stripe-Should-Retry`, `Retry-After` and body.
pub fn classify_v1(
    status: u16,
    should_retry: Option<bool>,
    retry_after: Option<Duration>,
    body: &str,
) -> Answer {
    let message = error_message(body);
    if (200..300).contains(&status) {
        return Answer::Accepted;
    }
    if status == 400 && message.contains(DUPLICATE_MESSAGE) {
        return Answer::Duplicate;
    }
    if status == 401 || status == 403 {
        return Answer::Unauthorized { status };
    }
    let transient = status == 409 || status == 429 || status >= 500;
    match should_retry {
        Some(true) => retry(status, retry_after),
        Some(false) => Answer::Rejected { status, message },
        None if transient => retry(status, retry_after),
        None => Answer::Rejected { status, message },
    }
}

/// Classifies an answer of the v2 meter event stream.
pub fn classify_v2(status: u16, retry_after: Option<Duration>, body: &str) -> Answer {
    if (200..300).contains(&status) {
        return Answer::Accepted;
    }
    if status == 401 && error_code(body) == "billing_meter_event_session_expired" {
        return Answer::SessionExpired;
    }
    if status == 401 || status == 403 {
        return Answer::Unauthorized { status };
    }
    if status == 409 || status == 429 || status >= 500 {
        return retry(status, retry_after);
    }
    Answer::Rejected {
        status,
        message: error_message(body),
    }
}

fn retry(status: u16, retry_after: Option<Duration>) -> Answer {
    Answer::Retry {
        reason: match status {
            429 => "rate_limited".into(),
            s if s >= 500 => "server_error".into(),
            s => format!("http_{s}"),
        },
        retry_after,
        new_key: status >= 500,
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: String,
}

fn error_message(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .map(|b| b.error.message)
        .unwrap_or_else(|_| body.chars().take(300).collect())
}

fn error_code(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .map(|b| b.error.code)
        .unwrap_or_default()
}

/// What a read of the Stripe API got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// 2xx: the body.
    Ok(String),
    /// 404: no such object.
    NotFound,
    /// No answer, 409, 429 or 5xx: try again after a backoff (at least `retry_after`).
    Retry {
        /// Short cause for logs and metrics.
        reason: String,
        /// What `Retry-After` asked for.
        retry_after: Option<Duration>,
    },
    /// Refused for good (401/403: the key; another 4xx: the request).
    Refused {
        /// HTTP status.
        status: u16,
        /// Stripe's message (never the key).
        message: String,
    },
}

/// A v2 meter event session (no `Debug`: it holds a token).
#[derive(Clone, Deserialize)]
pub struct Session {
    /// The token for the stream (a secret: never logged).
    pub authentication_token: String,
    /// When it was created (RFC 3339).
    pub created: chrono::DateTime<chrono::Utc>,
    /// When it expires (RFC 3339).
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// A Stripe billing meter (the fields reconciliation needs).
#[derive(Debug, Clone, Deserialize)]
pub struct Meter {
    /// `mtr_…`.
    pub id: String,
    /// The event name it aggregates.
    pub event_name: String,
}

#[derive(Deserialize)]
struct List<T> {
    data: Vec<T>,
    has_more: bool,
}

#[derive(Deserialize)]
struct Summary {
    id: String,
    aggregated_value: f64,
}

/// What a path segment must escape (ids like `mtr_…` pass unchanged).
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// The HTTP side of billing.
#[derive(Clone)]
pub struct StripeClient {
    http: reqwest::Client,
    api_base: String,
    stream_base: String,
    api_key: String,
    api_version: String,
}

impl StripeClient {
    /// A client for `config` (no proxy from the environment for loopback bases; timeouts from the config).
    pub fn new(config: &StripeConfig) -> Result<StripeClient, BillingError> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BillingError::Http(e.to_string()))?;
        Ok(StripeClient {
            http,
            api_base: config.api_base.trim_end_matches('/').to_owned(),
            stream_base: config.stream_base().trim_end_matches('/').to_owned(),
            api_key: config.api_key.clone(),
            api_version: config.api_version.clone(),
        })
    }

    fn post(&self, url: String, bearer: &str) -> reqwest::RequestBuilder {
        self.http
            .post(url)
            .bearer_auth(bearer)
            .header("Stripe-Version", &self.api_version)
    }

    /// `POST /v1/billing/meter_events` for `row` (`identifier` = the row id, `timestamp` = window start).
    pub async fn send_meter_event(&self, row: &OutboxRow, idempotency_key: &str) -> Answer {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("event_name", &row.event_name)
            .append_pair("identifier", &row.id)
            .append_pair("payload[stripe_customer_id]", &row.stripe_customer)
            .append_pair("payload[value]", &row.value.to_string())
            .append_pair("timestamp", &row.timestamp().to_string())
            .finish();
        let sent = self
            .post(
                format!("{}/v1/billing/meter_events", self.api_base),
                &self.api_key,
            )
            .header("Idempotency-Key", idempotency_key)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await;
        match sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let should_retry = header(resp.headers(), "stripe-should-retry")
                    .map(|v| v.eq_ignore_ascii_case("true"));
                let retry_after = retry_after(resp.headers());
                let body = resp.text().await.unwrap_or_default();
                classify_v1(status, should_retry, retry_after, &body)
            }
            Err(e) => transport(&e),
        }
    }

    /// `POST /v2/billing/meter_event_session`.
    pub async fn create_session(&self) -> Result<Session, Answer> {
        let sent = self
            .post(
                format!("{}/v2/billing/meter_event_session", self.api_base),
                &self.api_key,
            )
            .send()
            .await;
        let resp = sent.map_err(|e| transport(&e))?;
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers());
        let body = resp.text().await.unwrap_or_default();
        match classify_v2(status, retry_after, &body) {
            Answer::Accepted => serde_json::from_str(&body).map_err(|e| Answer::Retry {
                reason: format!("unreadable session: {e}"),
                retry_after: None,
                new_key: false,
            }),
            // The session call authenticates with the API key: an expiry here is a key problem.
            Answer::SessionExpired => Err(Answer::Unauthorized { status }),
            other => Err(other),
        }
    }

    /// `POST /v2/billing/meter_event_stream` with at most 100 rows.
    pub async fn stream(&self, token: &str, rows: &[OutboxRow]) -> Answer {
        let events: Vec<serde_json::Value> = rows
            .iter()
            .map(|row| {
                let ts = chrono::DateTime::from_timestamp_millis(row.window_start_ms)
                    .unwrap_or_default()
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                serde_json::json!({
                    "event_name": row.event_name,
                    "identifier": row.id,
                    "payload": {
                        "stripe_customer_id": row.stripe_customer,
                        "value": row.value.to_string(),
                    },
                    "timestamp": ts,
                })
            })
            .collect();
        let sent = self
            .post(
                format!("{}/v2/billing/meter_event_stream", self.stream_base),
                token,
            )
            .json(&serde_json::json!({ "events": events }))
            .send()
            .await;
        match sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after = retry_after(resp.headers());
                let body = resp.text().await.unwrap_or_default();
                classify_v2(status, retry_after, &body)
            }
            Err(e) => transport(&e),
        }
    }

    fn get_request(&self, path: &str, query: &[(&str, String)]) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{}", self.api_base, path))
            .bearer_auth(&self.api_key)
            .header("Stripe-Version", &self.api_version)
            .query(query)
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, BillingError> {
        let resp = self
            .get_request(path, query)
            .send()
            .await
            .map_err(|e| BillingError::Http(e.without_url().to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .text()
            .await
            .map_err(|e| BillingError::Http(e.without_url().to_string()))?;
        if !(200..300).contains(&status) {
            let message = if status == 401 || status == 403 {
                "Stripe refused the API key".to_owned()
            } else {
                error_message(&body)
            };
            return Err(BillingError::Stripe { status, message });
        }
        serde_json::from_str(&body).map_err(|e| BillingError::Stripe {
            status,
            message: format!("unreadable answer to GET {path}: {e}"),
        })
    }

    /// One `GET` of the API, classified for retries like meter events (`path` segments already escaped).
    pub async fn read(&self, path: &str, query: &[(&str, String)]) -> Read {
        let sent = self.get_request(path, query).send().await;
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                return Read::Retry {
                    reason: if e.is_timeout() {
                        "timeout"
                    } else {
                        "transport_error"
                    }
                    .into(),
                    retry_after: None,
                };
            }
        };
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers());
        let body = match resp.text().await {
            Ok(body) => body,
            Err(_) => {
                return Read::Retry {
                    reason: "transport_error".into(),
                    retry_after,
                };
            }
        };
        match status {
            200..=299 => Read::Ok(body),
            404 => Read::NotFound,
            401 | 403 => Read::Refused {
                status,
                message: "Stripe refused the API key".into(),
            },
            409 | 429 | 500.. => match retry(status, retry_after) {
                Answer::Retry {
                    reason,
                    retry_after,
                    ..
                } => Read::Retry {
                    reason,
                    retry_after,
                },
                _ => Read::Retry {
                    reason: format!("http_{status}"),
                    retry_after,
                },
            },
            _ => Read::Refused {
                status,
                message: error_message(&body),
            },
        }
    }

    /// `GET /v1/subscriptions/{id}`.
    pub async fn subscription(&self, id: &str) -> Read {
        let path = format!(
            "/v1/subscriptions/{}",
            percent_encoding::utf8_percent_encode(id, PATH_SEGMENT)
        );
        self.read(&path, &[]).await
    }

    /// One page (up to 100) of `GET /v1/subscriptions?customer=…&status=all`, after `starting_after`.
    pub async fn subscriptions(&self, customer: &str, starting_after: Option<&str>) -> Read {
        let mut query = vec![
            ("customer", customer.to_owned()),
            ("status", "all".to_owned()),
            ("limit", "100".to_owned()),
        ];
        if let Some(after) = starting_after {
            query.push(("starting_after", after.to_owned()));
        }
        self.read("/v1/subscriptions", &query).await
    }

    /// Every meter (`GET /v1/billing/meters`, all pages).
    pub async fn list_meters(&self) -> Result<Vec<Meter>, BillingError> {
        let mut out: Vec<Meter> = Vec::new();
        loop {
            let mut query = vec![("limit", "100".to_owned())];
            if let Some(last) = out.last() {
                query.push(("starting_after", last.id.clone()));
            }
            let page: List<Meter> = self.get("/v1/billing/meters", &query).await?;
            let more = page.has_more && !page.data.is_empty();
            out.extend(page.data);
            if !more {
                return Ok(out);
            }
        }
    }

    /// Sum of `aggregated_value` of `GET /v1/billing/meters/{id}/event_summaries` for `customer` over
    /// `[start, end)` (Unix seconds, minute-aligned).
    pub async fn summary_total(
        &self,
        meter_id: &str,
        customer: &str,
        start: i64,
        end: i64,
    ) -> Result<f64, BillingError> {
        let path = format!(
            "/v1/billing/meters/{}/event_summaries",
            percent_encoding::utf8_percent_encode(meter_id, PATH_SEGMENT)
        );
        let mut total = 0.0;
        let mut after: Option<String> = None;
        loop {
            let mut query = vec![
                ("customer", customer.to_owned()),
                ("start_time", start.to_string()),
                ("end_time", end.to_string()),
                ("limit", "100".to_owned()),
            ];
            if let Some(a) = &after {
                query.push(("starting_after", a.clone()));
            }
            let page: List<Summary> = self.get(&path, &query).await?;
            total += page.data.iter().map(|s| s.aggregated_value).sum::<f64>();
            match page.data.last() {
                Some(last) if page.has_more => after = Some(last.id.clone()),
                _ => return Ok(total),
            }
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v: &HeaderValue| v.to_str().ok())
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    header(headers, "retry-after")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3_600.0)))
}

/// A request that got no answer: retried with the same Idempotency-Key (Stripe may have processed it).
fn transport(e: &reqwest::Error) -> Answer {
    Answer::Retry {
        reason: if e.is_timeout() {
            "timeout".into()
        } else {
            "transport_error".into()
        },
        retry_after: None,
        new_key: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_answers() {
        let dup = r#"{"error":{"type":"invalid_request_error","message":"An event already exists with identifier tg-1."}}"#;
        assert_eq!(classify_v1(200, None, None, "{}"), Answer::Accepted);
        assert_eq!(classify_v1(400, Some(false), None, dup), Answer::Duplicate);
        assert_eq!(
            classify_v1(401, None, None, "{}"),
            Answer::Unauthorized { status: 401 }
        );
        assert_eq!(
            classify_v1(403, Some(true), None, "{}"),
            Answer::Unauthorized { status: 403 }
        );
        let ra = Some(Duration::from_secs(2));
        assert_eq!(
            classify_v1(429, Some(true), ra, "{}"),
            Answer::Retry {
                reason: "rate_limited".into(),
                retry_after: ra,
                new_key: false
            }
        );
        assert!(matches!(
            classify_v1(500, None, None, "{}"),
            Answer::Retry { new_key: true, .. }
        ));
        assert!(matches!(
            classify_v1(503, Some(false), None, "{}"),
            Answer::Rejected { status: 503, .. }
        ));
        assert!(matches!(
            classify_v1(400, Some(true), None, "{}"),
            Answer::Retry { new_key: false, .. }
        ));
        let bad =
            r#"{"error":{"type":"invalid_request_error","message":"No such customer: 'cus_X'"}}"#;
        assert_eq!(
            classify_v1(400, None, None, bad),
            Answer::Rejected {
                status: 400,
                message: "No such customer: 'cus_X'".into()
            }
        );
    }

    #[test]
    fn v2_answers() {
        let expired = r#"{"error":{"code":"billing_meter_event_session_expired","message":"m","type":"temporary_session_expired","doc_url":"u"}}"#;
        assert_eq!(classify_v2(401, None, expired), Answer::SessionExpired);
        assert_eq!(
            classify_v2(401, None, r#"{"error":{"code":"x","message":"m"}}"#),
            Answer::Unauthorized { status: 401 }
        );
        assert_eq!(classify_v2(200, None, "{}"), Answer::Accepted);
        assert!(matches!(classify_v2(500, None, "{}"), Answer::Retry { .. }));
        assert!(matches!(
            classify_v2(400, None, "{}"),
            Answer::Rejected { .. }
        ));
    }
}
