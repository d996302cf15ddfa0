//! GenAI token metering and token quotas through a real Envoy 1.40 (CONTRACT §11): client -> Envoy (ext_authz,
//! ext_proc on `/llm/` only, gRPC access log) -> fake LLM (`examples/quickstart/upstream.py`), tollgate reading
//! the response bodies, billing to the Stripe emulator.

mod support;

#[path = "support/stripe.rs"]
mod stripe_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use stripe_support::{API_KEY, StripeEmulator};
use support::{
    Envoy, FakeLlm, RedisServer, Tollgate, envoy_config_llm, http_client, key_hash, poll_until,
    with_stream_token,
};

const KEY: &str = "tg_test_GenAiTokensKeyZBoBcuk7Kp4aggzLahAQ5tvTRefxE";
const KEY_CUT: &str = "tg_test_GenAiCutStreamKeyBcuk7Kp4aggzLahAQ5tvTRefxE";
const KEY_CUT_OPENAI: &str = "tg_test_GenAiCutOpenAiKeyBcuk7Kp4aggzLahAQ5tvTRefxE";
const KEY_CUT_ANTHROPIC: &str = "tg_test_GenAiCutAnthropicKeyk7Kp4aggzLahAQ5tvTRefxE";
const KEY_QUOTA: &str = "tg_test_GenAiQuotaKeyBoBcuk7Kp4aggzLahAQ5tvTRefxE";

/// How long usage may take to reach the emulator.
const BILLED: Duration = Duration::from_secs(90);

fn catalog() -> String {
    format!(
        r#"
products:
  - name: chat
    operations: [{{api: llmapi, name: chat, paths: [/llm/chat/**]}}]
    meter: {{event_name: llm_tokens, value: genai:total_tokens}}
  - name: custom
    operations: [{{api: llmapi, name: custom, paths: [/llm/custom/**]}}]
    meter: {{event_name: llm_completion, value: 'response_json:/usage/completion_tokens'}}
  - name: metered_quota
    quota: {{limit: 5000, unit: day, counts: genai:total_tokens, reserve: 500}}
    operations: [{{api: llmapi, name: quota, paths: [/llm/quota/**]}}]
developers:
  - email: tokens@example.com
    stripe_customer: cus_Tokens
    apps:
      - name: tokenapp
        products: [{{name: chat}}, {{name: custom}}]
        keys: [{{hash: "{}"}}]
  - email: cut@example.com
    stripe_customer: cus_Cut
    apps:
      - name: cutapp
        products: [{{name: chat}}]
        keys: [{{hash: "{}"}}]
  - email: cut-openai@example.com
    stripe_customer: cus_CutOpenai
    apps:
      - name: cutopenai
        products: [{{name: chat}}]
        keys: [{{hash: "{}"}}]
  - email: cut-anthropic@example.com
    stripe_customer: cus_CutAnthropic
    apps:
      - name: cutanthropic
        products: [{{name: chat}}]
        keys: [{{hash: "{}"}}]
  - email: quota@example.com
    apps:
      - name: quotaapp
        products: [{{name: metered_quota}}]
        keys: [{{hash: "{}"}}]
"#,
        key_hash(KEY),
        key_hash(KEY_CUT),
        key_hash(KEY_CUT_OPENAI),
        key_hash(KEY_CUT_ANTHROPIC),
        key_hash(KEY_QUOTA)
    )
}

fn config(emulator: Option<&StripeEmulator>, quota: &str) -> String {
    let billing = emulator.map_or(String::new(), |e| {
        format!(
            "billing:\n  stripe:\n    api_base: {}\n    api_key: {API_KEY}\n    max_backoff: 1s\n    \
             initial_backoff: 50ms\n    request_timeout: 1s\n    poll_interval: 200ms\n",
            e.url()
        )
    });
    format!(
        "environment: test
catalog: {{path: catalog.yaml}}
identity: {{api_key: {{headers: [x-api-key]}}}}
api_context_extension: tollgate_api
metering: {{dir: ./data, window: 1s, lateness: 500ms}}
genai: {{max_buffer_bytes: 65536}}
{quota}{billing}"
    )
}

/// A call through Envoy read to its end: status and body.
async fn call(client: &reqwest::Client, envoy: &Envoy, key: &str, path: &str) -> (u16, String) {
    let response = client
        .get(envoy.url(path))
        .header("x-api-key", key)
        .send()
        .await
        .expect("call through Envoy");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

async fn billed(emulator: &StripeEmulator, expected: &BTreeMap<(String, String), u64>) {
    let deadline = Instant::now() + BILLED;
    loop {
        let totals = emulator.totals().await;
        let ours: BTreeMap<_, _> = totals
            .into_iter()
            .filter(|((customer, _), _)| customer == "cus_Tokens")
            .collect();
        if &ours == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Stripe totals {ours:?} never reached {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_every_provider_json_and_sse_are_billed_exactly() {
    let emulator = StripeEmulator::start();
    let llm = FakeLlm::start();
    let tollgate = Tollgate::start(&config(Some(&emulator), ""), &catalog()).await;
    let envoy = Envoy::start(&envoy_config_llm(&[tollgate.grpc_port], llm.port)).await;
    let client = http_client();

    let mut total = 0;
    let mut completion = 0;
    let mut n = 0;
    for provider in ["openai", "responses", "anthropic", "gemini"] {
        for stream in [0, 1] {
            n += 1;
            let (input, output) = (100 + n, 10 * n);
            let path = format!(
                "/llm/chat/x?provider={provider}&stream={stream}&input={input}&output={output}&chunks=5"
            );
            let (status, body) = call(&client, &envoy, KEY, &path).await;
            assert_eq!(status, 200, "{path}: {body}");
            total += input + output;
        }
    }
    // gzip is decoded; the response_json pointer reads any JSON API.
    let (status, _) = call(&client, &envoy, KEY, "/llm/chat/x?gzip=1&input=7&output=8").await;
    assert_eq!(status, 200);
    total += 15;
    // A chat stream whose client did not ask for usage bills the output it sent: one token per delta.
    let (status, _) = call(
        &client,
        &envoy,
        KEY,
        "/llm/chat/x?stream=1&include_usage=0&chunks=6",
    )
    .await;
    assert_eq!(status, 200);
    total += 6;
    let (status, _) = call(&client, &envoy, KEY, "/llm/custom/x?input=5&output=44").await;
    assert_eq!(status, 200);
    completion += 44;

    // Bodies that say nothing readable count 0, and the client still gets them whole.
    for path in [
        "/llm/chat/x?garbage=1",
        "/llm/chat/x?nonutf8=1",
        "/llm/chat/x?pad=200000",
        "/llm/chat/x?stream=1&pad=200000&chunks=1&provider=gemini",
    ] {
        let (status, body) = call(&client, &envoy, KEY, path).await;
        assert_eq!(status, 200, "{path}");
        assert!(!body.is_empty(), "{path}: the body reaches the client");
    }
    let (status, body) = call(&client, &envoy, KEY, "/llm/chat/x?pad=200000").await;
    assert_eq!(status, 200);
    assert!(
        body.len() > 200_000,
        "a body too large to read still passes"
    );

    let expected: BTreeMap<(String, String), u64> = [
        (("cus_Tokens".to_owned(), "llm_tokens".to_owned()), total),
        (
            ("cus_Tokens".to_owned(), "llm_completion".to_owned()),
            completion,
        ),
    ]
    .into_iter()
    .collect();
    billed(&emulator, &expected).await;
    let outcomes = |outcome: &'static str| {
        let tollgate = &tollgate;
        async move {
            tollgate
                .metric("tollgate_genai_responses_total", &[("outcome", outcome)])
                .await
                .unwrap_or(0.0)
        }
    };
    assert_eq!(outcomes("complete").await, 10.0);
    assert_eq!(outcomes("counted").await, 1.0, "the stream without usage");
    assert!(outcomes("too_large").await >= 2.0);
    assert!(
        outcomes("not_utf8").await + outcomes("malformed").await + outcomes("truncated").await
            >= 2.0
    );
    let missing = tollgate
        .metric("tollgate_metering_missing_usage_values_total", &[])
        .await
        .unwrap_or(0.0);
    assert!(missing >= 5.0, "every unreadable body is said: {missing}");
    assert_eq!(
        emulator.state().await["schema_errors"],
        serde_json::json!([])
    );

    // Routes without ext_proc never reach it.
    let streams_before = tollgate.metric("tollgate_genai_skipped_total", &[]).await;
    let (status, _) = call(&client, &envoy, KEY, "/forecast").await;
    assert_eq!(status, 403, "no product covers /forecast");
    assert_eq!(
        tollgate.metric("tollgate_genai_skipped_total", &[]).await,
        streams_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_access_log_token_only_the_envoy_presenting_it_reads_bodies() {
    let config = format!("access_log_token: s3cret-token\n{}", config(None, ""));
    let llm = FakeLlm::start();
    let tollgate = Tollgate::start(&config, &catalog()).await;
    let plain = envoy_config_llm(&[tollgate.grpc_port], llm.port);
    let trusted = Envoy::start(&with_stream_token(&plain, "s3cret-token")).await;
    let stranger = Envoy::start(&with_stream_token(&plain, "guessed")).await;
    let client = http_client();
    let complete = || async {
        tollgate
            .metric("tollgate_genai_responses_total", &[("outcome", "complete")])
            .await
            .unwrap_or(0.0)
    };
    let (status, _) = call(&client, &trusted, KEY, "/llm/chat/x?input=5&output=7").await;
    assert_eq!(status, 200);
    assert_eq!(complete().await, 1.0, "the trusted Envoy's body is read");
    // ext_proc fails open (envoy/llm.yaml): the stranger's caller gets the answer, tollgate reads nothing.
    let (status, body) = call(&client, &stranger, KEY, "/llm/chat/x?input=5&output=7").await;
    assert_eq!(status, 200);
    assert!(body.contains("usage"), "the body still reaches the client");
    assert_eq!(complete().await, 1.0, "the stranger's body is not read");
    let refused = tollgate
        .metric("tollgate_genai_streams_unauthenticated_total", &[])
        .await;
    assert!(refused >= Some(1.0), "refusals are counted: {refused:?}");
    assert!(
        !tollgate.logs().contains("s3cret-token") && !tollgate.logs().contains("guessed"),
        "a token reached the log"
    );
}

/// Streams `path` with `key`, reads until `events` server-sent events reached the client, then drops the
/// connection (Envoy resets the upstream stream and ends ext_proc's without `end_of_stream`).
async fn cut_after(client: &reqwest::Client, envoy: &Envoy, key: &str, path: &str, events: usize) {
    let mut response = client
        .get(envoy.url(path))
        .header("x-api-key", key)
        .send()
        .await
        .expect("stream through Envoy");
    assert_eq!(response.status(), 200, "{path}");
    let mut seen = 0;
    while seen < events {
        let chunk = response
            .chunk()
            .await
            .expect("chunk bytes")
            .expect("a chunk");
        seen += chunk.windows(5).filter(|w| w == b"data:").count();
    }
}

/// What Stripe was told `customer` used of `llm_tokens`, once it was told.
async fn billed_tokens(emulator: &StripeEmulator, customer: &str) -> u64 {
    let deadline = Instant::now() + BILLED;
    loop {
        let totals = emulator.totals().await;
        if let Some(total) = totals.get(&(customer.to_owned(), "llm_tokens".to_owned())) {
            return *total;
        }
        assert!(
            Instant::now() < deadline,
            "the cut stream of {customer} was never billed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cuts_a_stream_is_billed_what_was_sent() {
    let emulator = StripeEmulator::start();
    let llm = FakeLlm::start();
    let tollgate = Tollgate::start(&config(Some(&emulator), ""), &catalog()).await;
    let envoy = Envoy::start(&envoy_config_llm(&[tollgate.grpc_port], llm.port)).await;
    let client = http_client();
    // Gemini reports the usage so far in every chunk: 20 input, then 50 output tokens over 10 chunks.
    // OpenAI reports nothing before its last chunk (input 20 is never said): each of the 50 content deltas
    // is one token, as OpenAI streams them (padded text: no delta is empty). Anthropic says its input (20) at the start and its output (50)
    // at the end: each of its 10 deltas counts at least one token.
    let gemini = "/llm/chat/x?provider=gemini&stream=1&input=20&output=50&chunks=10&delay_ms=150";
    let openai =
        "/llm/chat/x?provider=openai&stream=1&input=20&output=50&chunks=50&delay_ms=40&pad=60";
    let anthropic =
        "/llm/chat/x?provider=anthropic&stream=1&input=20&output=50&chunks=10&delay_ms=150";
    tokio::join!(
        cut_after(&client, &envoy, KEY_CUT, gemini, 3),
        cut_after(&client, &envoy, KEY_CUT_OPENAI, openai, 3),
        cut_after(&client, &envoy, KEY_CUT_ANTHROPIC, anthropic, 3),
    );

    let billed = billed_tokens(&emulator, "cus_Cut").await;
    let possible: Vec<u64> = (3..10).map(|k| 20 + 50 * k / 10).collect();
    assert!(
        possible.contains(&billed),
        "Gemini billed {billed}: what a chunk from the third on reported ({possible:?}), not the whole answer"
    );
    let billed = billed_tokens(&emulator, "cus_CutOpenai").await;
    assert!(
        (3..=50).contains(&billed),
        "OpenAI billed {billed}: the deltas sent, at least the 3 the client read, not the whole answer (70)"
    );
    let billed = billed_tokens(&emulator, "cus_CutAnthropic").await;
    assert!(
        (20 + 1..=20 + 10).contains(&billed),
        "Anthropic billed {billed}: the input and at least one token per delta sent, not the whole answer (70)"
    );
    let partial = tollgate
        .metric("tollgate_genai_responses_total", &[("outcome", "partial")])
        .await;
    assert_eq!(
        partial,
        Some(2.0),
        "Gemini and Anthropic had reported usage"
    );
    let counted = tollgate
        .metric("tollgate_genai_responses_total", &[("outcome", "counted")])
        .await;
    assert_eq!(counted, Some(1.0), "OpenAI had reported none");
    assert_eq!(
        emulator.state().await["schema_errors"],
        serde_json::json!([])
    );
}

/// The quota counter of `quotaapp`: used units in today's window.
async fn quota_used(tollgate: &Tollgate) -> u64 {
    let report: Json = http_client()
        .get(tollgate.admin_url("/v1/usage?app=quotaapp"))
        .send()
        .await
        .expect("GET /v1/usage")
        .json()
        .await
        .expect("usage JSON");
    report["quota"][0]["used"].as_u64().unwrap_or(0)
}

/// Token quota settlements with `result`, summed over `tollgates` (Envoy may keep its access-log stream on one
/// replica: they are counted where the entries went).
async fn settlements(tollgates: &[&Tollgate], result: &str) -> f64 {
    let mut total = 0.0;
    for t in tollgates {
        total += t
            .metric("tollgate_quota_settlements_total", &[("result", result)])
            .await
            .unwrap_or(0.0);
    }
    total
}

/// 16 parallel streams of 700 tokens each against a 5,000-token daily quota reserving 500 per call: calls
/// are admitted while the reserve fits, every call settles to its real count, and the window ends at most
/// the documented bound past its limit.
async fn parallel_streams_settle_within_the_bound(tollgates: &[&Tollgate], envoy: &Envoy) {
    let client = http_client();
    let path =
        "/llm/quota/x?provider=anthropic&stream=1&input=100&output=600&chunks=4&delay_ms=100";
    let mut calls = Vec::new();
    for _ in 0..16 {
        let client = client.clone();
        let url = envoy.url(path);
        calls.push(tokio::spawn(async move {
            let response = client
                .get(url)
                .header("x-api-key", KEY_QUOTA)
                .send()
                .await
                .expect("call through Envoy");
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            status
        }));
    }
    let mut admitted = 0;
    for call in calls {
        match call.await.expect("call task") {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    // 5000 / 500: at most 10 reserves fit at once.
    assert!(
        (1..=10).contains(&admitted),
        "admitted {admitted} of 16 parallel calls"
    );
    let settled = 700 * admitted;
    poll_until("every reserve settled", Duration::from_secs(20), || async {
        let mut used = 0;
        for t in tollgates {
            used = used.max(quota_used(t).await);
        }
        (used == settled).then_some(())
    })
    .await;
    // The bound: each call in flight may use (700 - 500) beyond its reserve.
    let overrun = settled.saturating_sub(5000);
    eprintln!(
        "token quota: {admitted} of 16 parallel calls admitted, settled {settled} of 5000, overrun {overrun} (bound {})",
        admitted * 200
    );
    assert!(overrun <= admitted * 200);
    // Full now (700 * admitted > 5000 - 500 once 7 or more were admitted): the next call does not fit.
    if settled + 500 > 5000 {
        let (status, _) = call(&client, envoy, KEY_QUOTA, path).await;
        assert_eq!(status, 429);
    }
    assert_eq!(
        settlements(tollgates, "settled").await,
        f64::from(u32::try_from(admitted).unwrap_or(u32::MAX))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_quota_reserves_at_the_check_and_settles_in_memory() {
    let llm = FakeLlm::start();
    let tollgate = Tollgate::start(&config(None, ""), &catalog()).await;
    let envoy = Envoy::start(&envoy_config_llm(&[tollgate.grpc_port], llm.port)).await;
    parallel_streams_settle_within_the_bound(&[&tollgate], &envoy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_quota_is_exact_across_replicas_on_redis() {
    let redis = RedisServer::start();
    let llm = FakeLlm::start();
    let quota = format!("quota: {{store: redis, redis_url: '{}'}}\n", redis.url());
    let a = Tollgate::start(&config(None, &quota), &catalog()).await;
    let b = Tollgate::start(&config(None, &quota), &catalog()).await;
    let envoy = Envoy::start(&envoy_config_llm(&[a.grpc_port, b.grpc_port], llm.port)).await;
    parallel_streams_settle_within_the_bound(&[&a, &b], &envoy).await;
}

/// A call whose access-log entry has not come by `quota.hold_timeout` gets its reserve back; when the entry
/// comes at last, its count is added afresh (never twice, never lost).
async fn a_hold_past_its_timeout_is_released_then_settled_late(
    tollgates: &[&Tollgate],
    envoy: &Envoy,
) {
    let client = http_client();
    // About 7 s of stream (under the test client's 10 s timeout) against a 2 s hold timeout.
    let path =
        "/llm/quota/x?provider=anthropic&stream=1&input=100&output=600&chunks=5&delay_ms=700";
    let url = envoy.url(path);
    let call = tokio::spawn(async move {
        let response = client
            .get(url)
            .header("x-api-key", KEY_QUOTA)
            .send()
            .await
            .expect("call through Envoy");
        let status = response.status().as_u16();
        let _ = response.bytes().await;
        status
    });
    let used = || async {
        let mut used = 0;
        for t in tollgates {
            used = used.max(quota_used(t).await);
        }
        used
    };
    poll_until("the reserve held", Duration::from_secs(10), || async {
        (used().await == 500).then_some(())
    })
    .await;
    poll_until("the reserve released", Duration::from_secs(10), || async {
        (used().await == 0).then_some(())
    })
    .await;
    assert_eq!(call.await.expect("call task"), 200);
    poll_until("the late settlement", Duration::from_secs(20), || async {
        (used().await == 700).then_some(())
    })
    .await;
    // The settlement counts its result just after it writes the store: wait for the count too.
    let late = poll_until(
        "the late settlement counted",
        Duration::from_secs(10),
        || async {
            let late = settlements(tollgates, "late").await;
            (late >= 1.0).then_some(late)
        },
    )
    .await;
    assert_eq!(late, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsettled_reserve_is_released_after_its_timeout_in_memory() {
    let llm = FakeLlm::start();
    let tollgate = Tollgate::start(&config(None, "quota: {hold_timeout: 2s}\n"), &catalog()).await;
    let envoy = Envoy::start(&envoy_config_llm(&[tollgate.grpc_port], llm.port)).await;
    a_hold_past_its_timeout_is_released_then_settled_late(&[&tollgate], &envoy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsettled_reserve_is_released_after_its_timeout_on_redis() {
    let redis = RedisServer::start();
    let llm = FakeLlm::start();
    let quota = format!(
        "quota: {{store: redis, redis_url: '{}', hold_timeout: 2s}}\n",
        redis.url()
    );
    let a = Tollgate::start(&config(None, &quota), &catalog()).await;
    let b = Tollgate::start(&config(None, &quota), &catalog()).await;
    let envoy = Envoy::start(&envoy_config_llm(&[a.grpc_port, b.grpc_port], llm.port)).await;
    a_hold_past_its_timeout_is_released_then_settled_late(&[&a, &b], &envoy).await;
}
