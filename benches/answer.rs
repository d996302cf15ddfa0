//! What the Check's answer costs tollgate: the ext_authz metadata built and encoded for every Check (as before
//! issue 20's "answer built once") against copied from `tollgate::envoy::answers`, and the whole answer
//! (`check_response` and its encoding, as tonic writes it) with the cache.
//! Run: `cargo bench --bench answer`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message;
use tollgate::check::{Identified, Reason, Upstream, Verdict};
use tollgate::envoy::{answers, authz, metadata};
use tollgate::quota::LimitState;

/// An allowed call shaped like the benchmark catalog's (bench/gen_catalog.py): every metadata field set.
fn allowed() -> Verdict {
    Verdict {
        reason: Reason::Allowed,
        message: String::new(),
        identity: Identified {
            app: Some("app000000".into()),
            developer: Some("dev000000@example.com".into()),
            company: Some("company0".into()),
            stripe_customer: Some("cus_000000".into()),
            product: Some("product-4".into()),
            operation: Some("get-forecast".into()),
        },
        api: Some("weather".into()),
        environment: Some("bench".into()),
        ratelimit: Some(LimitState {
            limit: 1_000_000_000,
            remaining: 999_999_000,
            reset_secs: 3_000,
        }),
        retry_after: None,
        credits_remaining: None,
        challenge: None,
        attributes: Vec::new(),
        quota_reserved: 0,
        upstream: Upstream {
            headers: vec![
                ("x-tollgate-app", "app000000".into()),
                ("x-tollgate-developer", "dev000000@example.com".into()),
                ("x-tollgate-product", "product-4".into()),
            ],
            remove_headers: vec!["x-api-key".into()],
            remove_query_params: Vec::new(),
        },
        answer: None,
    }
}

fn cases(c: &mut Criterion) {
    let verdict = allowed();
    let mut group = c.benchmark_group("metadata");
    group.bench_function("built", |b| {
        b.iter(|| black_box(metadata::write(black_box(&verdict)).encode_to_vec()));
    });
    group.bench_function("cached", |b| {
        b.iter(|| black_box(answers::encoded_metadata(black_box(&verdict))));
    });
    group.finish();
    // The whole answer, as the service builds and tonic encodes it (the verdict's clone included: the core
    // hands the adapter an owned verdict per Check).
    c.bench_function("check_response/allowed", |b| {
        b.iter(|| black_box(authz::check_response(black_box(&verdict).clone()).encode_to_vec()));
    });
}

criterion_group!(benches, cases);
criterion_main!(benches);
