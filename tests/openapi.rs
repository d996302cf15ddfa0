//! The management API's OpenAPI document (`src/state/api/openapi.json`) against the routes it describes.
//!
//! The document must name exactly the operations of `ROUTES`, and every answer the real router gives (the
//! admin router with its token check, over a real SQLite store) must have a documented status and a body
//! the documented schema accepts. Every documented status of every operation is produced at least once,
//! so the document promises nothing the code never does.
//!
//! Schemas are checked by the small validator at the end of this file: the JSON Schema keywords the
//! document uses, and an error for any other, so a keyword cannot be silently ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::service::Service as _;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};

use tollgate::app::admin::{self, AdminState};
use tollgate::app::metrics::Metrics;
use tollgate::billing::StripeConfig;
use tollgate::catalog::CatalogHandle;
use tollgate::credits::{CreditMetrics, CreditOptions, Credits};
use tollgate::metering::{Metering, MeteringOptions};
use tollgate::paywall::Paywall;
use tollgate::paywall::metrics::PaywallMetrics;
use tollgate::paywall::model::{Observation, PaidStatus, PriceItem, SubscriptionState};
use tollgate::quota::memory::MemoryStore;
use tollgate::source::Source;
use tollgate::state::api::{self, MAX_BODY_BYTES, ManagementState, OPENAPI, ROUTES};
use tollgate::state::metrics::StateMetrics;
use tollgate::state::model::Write;
use tollgate::state::sql::SqlStore;
use tollgate::state::store::Actor;
use tollgate::state::sync::Syncer;
use tollgate::state::{Snapshot, StateStore};

const TOKEN: &str = "s3cret-admin-token";

const CATALOG: &str = "
products:
  - name: weather_free
    approval: auto
    operations: [{api: weatherapi, paths: [/forecastrss]}]
  - name: weather_gold
    approval: manual
    operations: [{api: weatherapi, paths: [/]}]
developers:
  - email: ntesla@theremin.com
    company: theremin
    apps:
      - name: weatherapp
        client_id: weatherapp
        products: [{name: weather_free, status: approved}]
";

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

fn doc() -> Value {
    serde_json::from_str(OPENAPI).expect("openapi.json is JSON")
}

/// The document's operations as (METHOD, path).
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

fn resolve<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("external $ref {r}"));
        v = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("$ref {r} does not resolve"));
    }
    v
}

fn operation<'a>(doc: &'a Value, method: &str, route: &str) -> &'a Value {
    let op = &doc["paths"][route][method.to_lowercase()];
    assert!(op.is_object(), "{method} {route} is not documented");
    op
}

/// The documented parameters of an operation (path-level and its own), by (in, name).
fn parameters(doc: &Value, method: &str, route: &str) -> BTreeMap<(String, String), Value> {
    let item = &doc["paths"][route];
    let own = &item[method.to_lowercase()]["parameters"];
    [&item["parameters"], own]
        .into_iter()
        .filter_map(Value::as_array)
        .flatten()
        .map(|p| {
            let p = resolve(doc, p);
            let key = (
                p["in"].as_str().unwrap().to_owned(),
                p["name"].as_str().unwrap().to_owned(),
            );
            (key, p.clone())
        })
        .collect()
}

#[test]
fn the_document_describes_exactly_the_routes() {
    let doc = doc();
    let version = doc["openapi"].as_str().expect("openapi");
    assert!(version.starts_with("3.1."), "openapi {version}");
    // Pretty-printed with a 2-space indent, one value or key per line.
    assert!(OPENAPI.ends_with("}\n") && OPENAPI.lines().count() > 100);
    for line in OPENAPI.lines() {
        let indent = line.len() - line.trim_start().len();
        assert!(
            indent % 2 == 0 && !line.trim().is_empty(),
            "not pretty-printed: {line:?}"
        );
    }

    let documented = operations(&doc);
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(ROUTES.len(), routed.len(), "ROUTES holds a duplicate");
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from the document: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "documented operations with no route: {unrouted:?}"
    );

    // Every $ref resolves.
    fn refs(doc: &Value, v: &Value) {
        match v {
            Value::Object(map) => {
                if let Some(r) = map.get("$ref") {
                    resolve(doc, &json!({"$ref": r}));
                }
                map.values().for_each(|v| refs(doc, v));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(doc, v)),
            _ => {}
        }
    }
    refs(&doc, &doc);

    let mut ids = BTreeSet::new();
    for (method, route) in &documented {
        let op = operation(&doc, method, route);
        let id = op["operationId"].as_str().expect("operationId");
        assert!(ids.insert(id.to_owned()), "operationId {id} twice");
        // Path parameters: exactly the template's.
        let params = parameters(&doc, method, route);
        let in_path: BTreeSet<&str> = params
            .keys()
            .filter(|(at, _)| at == "path")
            .map(|(_, name)| name.as_str())
            .collect();
        let in_template: BTreeSet<&str> = route
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        assert_eq!(in_path, in_template, "{method} {route}: path parameters");
        // Writes take an Idempotency-Key; every operation sits behind the admin token.
        let idempotent = params.contains_key(&("header".to_owned(), "Idempotency-Key".to_owned()));
        assert_eq!(
            idempotent,
            method != "GET",
            "{method} {route}: Idempotency-Key"
        );
        assert!(op["responses"]["401"].is_object(), "{method} {route}: 401");
    }
    assert_eq!(doc["security"], json!([{"bearerAuth": []}]));
    let bearer = &doc["components"]["securitySchemes"]["bearerAuth"];
    assert_eq!(
        (&bearer["type"], &bearer["scheme"]),
        (&json!("http"), &json!("bearer"))
    );
}

/// The admin router (token check included) over the management API on a fresh SQLite store.
struct Api {
    service: TowerToHyperService<Router>,
    store: SqlStore,
    doc: Value,
    /// (METHOD, route, status) answered so far.
    seen: BTreeSet<(String, String, u16)>,
    _dir: tempfile::TempDir,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

/// No request body.
const EMPTY: Value = Value::Null;

impl Api {
    /// The admin router over a fresh store; `paywall`: with `billing.stripe` configured (Stripe drives access);
    /// `credits`: serving `/v1/credits` (prepaid balances, on the same store, default `credits:` options).
    async fn start(paywall: bool, credits: bool) -> Api {
        let dir = tempfile::tempdir().unwrap();
        let source = Source::from_text("catalog.yaml", CATALOG.to_owned());
        let catalog = tollgate::catalog::parse(&source).expect("catalog");
        let handle = Arc::new(CatalogHandle::new(catalog.clone()));
        let snapshot = Arc::new(Snapshot::new(Arc::clone(&handle), None));
        snapshot.install_file(catalog).unwrap();
        let store = SqlStore::open(&format!("sqlite://{}/state.db", dir.path().display())).unwrap();
        store.migrate().await.unwrap();
        let shared: Arc<dyn StateStore> = Arc::new(store.clone());
        let registry = prometheus::Registry::new();
        let metrics = StateMetrics::register(&registry).unwrap();
        let syncer = Syncer::new(Arc::clone(&shared), Arc::clone(&snapshot), metrics.clone());
        let syncer = Arc::new(syncer);
        syncer.catch_up().await.unwrap();
        let paywall = paywall.then(|| {
            let config = StripeConfig::new("http://127.0.0.1:9", "sk_test_never_called");
            let metrics = PaywallMetrics::register(&registry).unwrap();
            Paywall::new(
                &config,
                Arc::clone(&shared),
                Arc::clone(&handle),
                Arc::new(tokio::sync::Notify::new()),
                metrics,
            )
            .unwrap()
        });
        let credits = if credits {
            let metrics = CreditMetrics::new(&registry).unwrap();
            let ledger = Arc::new(store.clone());
            let options = CreditOptions::default();
            let credits =
                Credits::start(ledger, "replica-openapi".to_owned(), options, metrics, None);
            credits.recover().await.unwrap();
            Some(Arc::new(credits))
        } else {
            None
        };
        let management = api::router(ManagementState {
            store: shared,
            snapshot,
            syncer: Arc::clone(&syncer),
            metrics,
            actor: api::actor(Some(TOKEN)),
            paywall,
            credits,
        });
        let window = Duration::from_secs(60);
        let options = MeteringOptions::with_spool_producer(dir.path().join("m"), window, window);
        let metering = Metering::open(options, Arc::clone(&handle), &registry);
        let admin = AdminState {
            metrics: Metrics::new().unwrap(),
            quota: Arc::new(MemoryStore::new()),
            catalog: handle,
            metering: metering.await.unwrap(),
            billing: None,
            admin_token: Some(Arc::from(TOKEN)),
            syncer: Some(syncer),
            history: None,
        };
        Api {
            service: TowerToHyperService::new(admin::router(admin, Some(management))),
            store,
            doc: doc(),
            seen: BTreeSet::new(),
            _dir: dir,
        }
    }

    /// Sends `request` (`"METHOD /path?query"`) with `headers` and checks the answer against the document.
    async fn send(&mut self, request: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> Answer {
        let (method, path) = request.split_once(' ').unwrap();
        let route = route_of(method, path);
        let mut builder = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        if !body.is_empty() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder.body(Body::from(body.clone())).unwrap();
        let (parts, answer) = self.service.call(request).await.unwrap().into_parts();
        let bytes = answer.collect().await.unwrap().to_bytes();
        let answer = Answer {
            status: parts.status,
            headers: parts.headers,
            body: serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{method} {path}: {} is not JSON ({e}): {bytes:?}",
                    parts.status
                )
            }),
        };
        self.check(method, route, path, &body, &answer);
        answer
    }

    /// The answer's status is documented for the operation and its body fits the documented schema; a
    /// successful write's request body fits the documented request schema.
    fn check(&mut self, method: &str, route: &str, path: &str, sent: &[u8], answer: &Answer) {
        let doc = &self.doc;
        let op = operation(doc, method, route);
        let status = answer.status.as_u16();
        let documented = &op["responses"][status.to_string()];
        let body = &answer.body;
        assert!(
            documented.is_object(),
            "{method} {path}: {status} undocumented: {body}"
        );
        let response = resolve(doc, documented);
        let content_type = answer
            .headers
            .get("content-type")
            .map(|v| v.to_str().unwrap());
        assert_eq!(content_type, Some("application/json"), "{method} {path}");
        let schema = &response["content"]["application/json"]["schema"];
        if let Err(e) = validate(doc, schema, body, "body") {
            panic!("{method} {path} -> {status}: {e}\n{body:#}");
        }
        for name in ["idempotent-replayed", "www-authenticate"] {
            if answer.headers.contains_key(name) {
                let headers = response["headers"].as_object().into_iter().flatten();
                let listed = headers
                    .map(|(k, _)| k)
                    .any(|k| k.eq_ignore_ascii_case(name));
                assert!(
                    listed,
                    "{method} {path} -> {status}: header {name} undocumented"
                );
            }
        }
        if answer.status.is_success() && op.get("requestBody").is_some() {
            let sent = serde_json::from_slice(sent).unwrap_or(json!({}));
            let request = &resolve(doc, &op["requestBody"])["content"]["application/json"];
            if let Err(e) = validate(doc, &request["schema"], &sent, "request") {
                panic!("{method} {path} succeeded with a body the document refuses: {e}\n{sent}");
            }
        }
        self.seen
            .insert((method.to_owned(), route.to_owned(), status));
    }

    /// Sends `request` with the admin token, `key` as its `Idempotency-Key` and `body` (JSON; null: none).
    async fn call(&mut self, request: &str, body: Value, key: Option<&str>) -> Answer {
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let auth = format!("Bearer {TOKEN}");
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(key.map(|key| ("idempotency-key", key)));
        self.send(request, bytes, &headers).await
    }

    /// Sends `request` with the admin token and `body` (JSON; null: none), asserts the status and, when
    /// `error` is not empty, the error code; returns the answer's body.
    async fn expect(&mut self, request: &str, body: Value, status: u16, error: &str) -> Value {
        self.expect_keyed(request, body, None, status, error).await
    }

    /// [`Api::expect`] with `key` as the `Idempotency-Key`.
    async fn expect_keyed(
        &mut self,
        request: &str,
        body: Value,
        key: Option<&str>,
        status: u16,
        error: &str,
    ) -> Value {
        let answer = self.call(request, body, key).await;
        let got = &answer.body;
        assert_eq!(answer.status.as_u16(), status, "{request}: {got}");
        if !error.is_empty() {
            assert_eq!(got["error"], error, "{request}: {got}");
        }
        answer.body
    }

    /// A 400 `invalid` for an unknown body field: the fields serde expects are the schema's properties.
    async fn fields_match(&mut self, request: &str, body: Value, schema: &str) {
        self.fields_match_keyed(request, body, None, schema).await;
    }

    /// [`Api::fields_match`] with `key` as the `Idempotency-Key`.
    async fn fields_match_keyed(
        &mut self,
        request: &str,
        body: Value,
        key: Option<&str>,
        schema: &str,
    ) {
        let e = self.expect_keyed(request, body, key, 400, "invalid").await;
        let message = e["message"].as_str().unwrap();
        let (_, expected) = message.split_once("expected").expect(message);
        let expected: BTreeSet<&str> = expected.split('`').skip(1).step_by(2).collect();
        let schema = &self.doc["components"]["schemas"][schema];
        assert_eq!(schema["additionalProperties"], json!(false), "{schema}");
        let properties: BTreeSet<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(expected, properties, "{request}: {message}");
    }
}

/// The one route `path` is an instance of.
fn route_of(method: &str, path: &str) -> &'static str {
    let segments: Vec<&str> = path.split('?').next().unwrap().split('/').collect();
    let fits = |route: &str| {
        let template: Vec<&str> = route.split('/').collect();
        template.len() == segments.len()
            && template
                .iter()
                .zip(&segments)
                .all(|(t, s)| t.starts_with('{') || t == s)
    };
    let routes: Vec<&str> = ROUTES
        .iter()
        .filter(|(m, r)| *m == method && fits(r))
        .map(|(_, r)| *r)
        .collect();
    assert_eq!(routes.len(), 1, "{method} {path} fits {routes:?}");
    routes[0]
}

/// An instance of each route, parameters filled in.
fn instance(route: &str) -> String {
    let path = route
        .replace("{email}", "ada@example.com")
        .replace("{app}", "ada-app")
        .replace("{product}", "weather_free")
        .replace("{id}", "key_none")
        .replace("{owner}", "theremin");
    match route {
        "/v1/subscriptions" => format!("{path}?customer=cus_Ada"),
        _ => path,
    }
}

/// `field` of each item of a list answer.
fn each<'a>(list: &'a Value, field: &str) -> Vec<&'a str> {
    let items = list["data"].as_array().unwrap().iter();
    items.map(|item| item[field].as_str().unwrap()).collect()
}

#[tokio::test]
async fn every_answer_is_documented_and_every_documented_status_happens() {
    let mut api = Api::start(true, true).await;
    let doc = api.doc.clone();
    let big = json!({"company": "x".repeat(MAX_BODY_BYTES)});

    // The document serves itself; every route needs the token.
    let served = api.expect("GET /v1/openapi.json", EMPTY, 200, "").await;
    assert_eq!(served, doc);
    for (method, route) in ROUTES {
        let request = format!("{method} {}", instance(route));
        for headers in [&[][..], &[("authorization", "Bearer wrong")]] {
            let answer = api.send(&request, Vec::new(), headers).await;
            assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{request}");
            assert_eq!(answer.body["error"], "unauthenticated");
        }
    }

    // Developers: store and catalog-file ones.
    let ada = "PUT /v1/developers/ada@example.com";
    let body =
        json!({"company": "Analytical", "stripe_customer": null, "attributes": {"tier": "gold"}});
    let created = api.expect(ada, body.clone(), 201, "").await;
    assert_eq!(
        (&created["source"], &created["attributes"]["tier"]),
        (&json!("store"), &json!("gold"))
    );
    api.expect(ada, body, 200, "").await;
    api.expect("PUT /v1/developers/grace@example.com", EMPTY, 201, "")
        .await;
    api.expect("PUT /v1/developers/not-an-email", EMPTY, 400, "invalid")
        .await;
    api.fields_match(ada, json!({"zz": 1}), "DeveloperInput")
        .await;
    api.expect(
        "PUT /v1/developers/ntesla@theremin.com",
        EMPTY,
        409,
        "defined_in_catalog",
    )
    .await;
    api.expect(ada, big.clone(), 413, "too_large").await;

    let got = api
        .expect("GET /v1/developers/ada@example.com", EMPTY, 200, "")
        .await;
    assert_eq!(got["source"], "store");
    let got = api
        .expect("GET /v1/developers/ntesla@theremin.com", EMPTY, 200, "")
        .await;
    assert_eq!(
        (&got["source"], &got["company"]),
        (&json!("catalog"), &json!("theremin"))
    );
    api.expect(
        "GET /v1/developers/nobody@example.com",
        EMPTY,
        404,
        "not_found",
    )
    .await;

    let list = api.expect("GET /v1/developers", EMPTY, 200, "").await;
    assert_eq!(
        each(&list, "email"),
        ["ada@example.com", "grace@example.com"],
        "store only"
    );
    assert_eq!(list["next_after"], Value::Null);
    let page = api
        .expect("GET /v1/developers?limit=1", EMPTY, 200, "")
        .await;
    assert_eq!(page["next_after"], "ada@example.com");
    let page = api
        .expect(
            "GET /v1/developers?limit=1&after=ada@example.com",
            EMPTY,
            200,
            "",
        )
        .await;
    assert_eq!(each(&page, "email"), ["grace@example.com"]);
    for bad in [
        "limit=0",
        "limit=1001",
        "developer=ada@example.com",
        "bogus=1",
    ] {
        api.expect(&format!("GET /v1/developers?{bad}"), EMPTY, 400, "invalid")
            .await;
    }

    // Apps.
    let ada_app = "PUT /v1/apps/ada-app";
    let products = json!([{"name": "weather_free"}, {"name": "weather_gold", "status": null}]);
    let body = json!({"developer": "ada@example.com", "products": products});
    let app = api.expect(ada_app, body, 201, "").await;
    assert_eq!(app["products"][0]["status"], "approved", "approval: auto");
    assert_eq!(app["products"][1]["status"], "pending", "approval: manual");
    let body = json!({"developer": "ada@example.com", "client_id": "ada-client", "status": "approved",
                      "products": [{"name": "weather_free", "status": "approved"}], "attributes": {}});
    api.expect(ada_app, body, 200, "").await;
    let body = json!({"developer": "ada@example.com", "products": [{"name": "nope"}]});
    let e = api.expect(ada_app, body, 400, "invalid").await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("products[0].name: "),
        "{e}"
    );
    let e = api.expect(ada_app, json!({}), 400, "invalid").await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("missing field `developer`"),
        "{e}"
    );
    assert_eq!(
        doc["components"]["schemas"]["AppInput"]["required"],
        json!(["developer"])
    );
    api.fields_match(ada_app, json!({"zz": 1}), "AppInput")
        .await;
    let body = json!({"developer": "ada@example.com", "products": [{"zz": 1}]});
    api.fields_match(ada_app, body, "SubscriptionInput").await;
    api.expect(
        ada_app,
        json!({"developer": "nobody@example.com"}),
        400,
        "invalid",
    )
    .await;
    let ada_dev = json!({"developer": "ada@example.com"});
    api.expect(
        "PUT /v1/apps/weatherapp",
        ada_dev.clone(),
        409,
        "defined_in_catalog",
    )
    .await;
    let body = json!({"developer": "ntesla@theremin.com"});
    api.expect("PUT /v1/apps/other", body, 409, "defined_in_catalog")
        .await;
    let body = json!({"developer": "ada@example.com", "client_id": "weatherapp"});
    api.expect("PUT /v1/apps/other", body, 409, "conflict")
        .await;
    let body = json!({"developer": "grace@example.com"});
    api.expect("PUT /v1/apps/grace-app", body, 201, "").await;
    api.expect("PUT /v1/apps/grace-app", ada_dev.clone(), 409, "conflict")
        .await;
    api.expect(ada_app, big.clone(), 413, "too_large").await;

    let list = api.expect("GET /v1/apps", EMPTY, 200, "").await;
    assert_eq!(each(&list, "name"), ["ada-app", "grace-app"], "store only");
    let page = api
        .expect(
            "GET /v1/apps?developer=grace@example.com&limit=1",
            EMPTY,
            200,
            "",
        )
        .await;
    assert_eq!(
        (each(&page, "name"), &page["next_after"]),
        (vec!["grace-app"], &json!("grace-app"))
    );
    api.expect("GET /v1/apps?limit=x", EMPTY, 400, "invalid")
        .await;
    let got = api.expect("GET /v1/apps/weatherapp", EMPTY, 200, "").await;
    assert_eq!(
        (&got["source"], &got["developer"]),
        (&json!("catalog"), &json!("ntesla@theremin.com"))
    );
    api.expect("GET /v1/apps/nope", EMPTY, 404, "not_found")
        .await;

    // Subscriptions.
    let gold = "PUT /v1/apps/ada-app/products/weather_gold";
    let app = api
        .expect(gold, json!({"status": "pending"}), 200, "")
        .await;
    assert_eq!(
        app["products"][1],
        json!({"name": "weather_gold", "status": "pending"})
    );
    api.expect(gold, json!({"status": "maybe"}), 400, "invalid")
        .await;
    let e = api.expect(gold, EMPTY, 400, "invalid").await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("missing field `status`"),
        "{e}"
    );
    api.fields_match(gold, json!({"zz": 1}), "SubscriptionStatusInput")
        .await;
    let approve = json!({"status": "approved"});
    for (app, product, status, error) in [
        ("ada-app", "nope", 404, "not_found"),
        ("ghost", "weather_gold", 404, "not_found"),
        ("weatherapp", "weather_gold", 409, "defined_in_catalog"),
    ] {
        let request = format!("PUT /v1/apps/{app}/products/{product}");
        api.expect(&request, approve.clone(), status, error).await;
    }
    api.expect(gold, big.clone(), 413, "too_large").await;

    // Keys: created, shown once, rotated, revoked.
    let keys = "POST /v1/apps/ada-app/keys";
    let live = api.expect(keys, EMPTY, 201, "").await;
    let body = json!({"environment": "test", "name": "ci", "expires_at": "2999-01-01T00:00:00Z"});
    let test = api.expect(keys, body, 201, "").await;
    for (key, prefix) in [(&live, "tg_live_"), (&test, "tg_test_")] {
        let secret = key["key"].as_str().unwrap();
        assert!(secret.starts_with(prefix), "{key}");
        assert_eq!(key["prefix"].as_str().unwrap(), &secret[..12]);
    }
    api.expect(keys, json!({"environment": "prod"}), 400, "invalid")
        .await;
    api.expect(
        keys,
        json!({"expires_at": "2001-01-01T00:00:00Z"}),
        400,
        "invalid",
    )
    .await;
    api.fields_match(keys, json!({"zz": 1}), "KeyInput").await;
    api.expect("POST /v1/apps/ghost/keys", EMPTY, 404, "not_found")
        .await;
    api.expect(
        "POST /v1/apps/weatherapp/keys",
        EMPTY,
        409,
        "defined_in_catalog",
    )
    .await;
    api.expect(keys, big.clone(), 413, "too_large").await;
    let got = api.expect("GET /v1/apps/ada-app", EMPTY, 200, "").await;
    assert_eq!(got["keys"].as_array().unwrap().len(), 2, "{got}");
    assert!(
        !got.to_string().contains(live["key"].as_str().unwrap()),
        "a key shown twice"
    );

    let test_id = test["id"].as_str().unwrap();
    let rotate = format!("POST /v1/apps/ada-app/keys/{test_id}/rotate");
    let rotated = api.expect(&rotate, json!({"grace": "1h"}), 201, "").await;
    assert!(
        rotated["key"].as_str().unwrap().starts_with("tg_test_"),
        "{rotated}"
    );
    assert_eq!(rotated["name"], "ci", "the old key's label");
    api.expect(&rotate, json!({"grace": "91days"}), 400, "invalid")
        .await;
    api.expect(&rotate, json!({"grace": "soon"}), 400, "invalid")
        .await;
    api.fields_match(&rotate, json!({"zz": 1}), "RotateInput")
        .await;
    api.expect(
        "POST /v1/apps/ada-app/keys/key_none/rotate",
        EMPTY,
        404,
        "not_found",
    )
    .await;
    let catalog_key = "POST /v1/apps/weatherapp/keys/key_none";
    api.expect(
        &format!("{catalog_key}/rotate"),
        EMPTY,
        409,
        "defined_in_catalog",
    )
    .await;
    api.expect(&rotate, big.clone(), 413, "too_large").await;

    let revoke = format!("POST /v1/apps/ada-app/keys/{test_id}/revoke");
    let revoked = api.expect(&revoke, EMPTY, 200, "").await;
    assert_eq!(
        (&revoked["status"], revoked.get("key")),
        (&json!("revoked"), None)
    );
    api.expect(&rotate, EMPTY, 409, "conflict").await;
    api.expect(
        "POST /v1/apps/ada-app/keys/key_none/revoke",
        EMPTY,
        404,
        "not_found",
    )
    .await;
    api.expect(
        &format!("{catalog_key}/revoke"),
        EMPTY,
        409,
        "defined_in_catalog",
    )
    .await;
    api.expect(&revoke, big.clone(), 413, "too_large").await;

    // Idempotency-Key: a replay answers the first answer (the key included); another request with the
    // key is a 409; a malformed key is a 400 on every write.
    let auth = format!("Bearer {TOKEN}");
    let idempotent = [
        ("authorization", auth.as_str()),
        ("idempotency-key", "0b7d5e0c-5f0a-4c39"),
    ];
    let first = api.send(keys, b"{}".to_vec(), &idempotent).await;
    let again = api.send(keys, b"{}".to_vec(), &idempotent).await;
    assert_eq!(
        (first.status, again.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert_eq!(first.body, again.body, "a replay answers the first answer");
    assert_eq!(again.headers["idempotent-replayed"], "true");
    let other = api
        .send(keys, br#"{"name":"x"}"#.to_vec(), &idempotent)
        .await;
    assert_eq!(
        (other.status, &other.body["error"]),
        (StatusCode::CONFLICT, &json!("conflict"))
    );
    let malformed = [
        ("authorization", auth.as_str()),
        ("idempotency-key", "has space"),
    ];
    for (method, route) in ROUTES.iter().filter(|(m, _)| *m != "GET") {
        let request = format!("{method} {}", instance(route));
        let answer = api.send(&request, Vec::new(), &malformed).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{request}: {}",
            answer.body
        );
        assert!(
            answer.body["message"]
                .as_str()
                .unwrap()
                .starts_with("Idempotency-Key: ")
        );
    }

    // Audit.
    let audit = api.expect("GET /v1/audit", EMPTY, 200, "").await;
    let rows = audit["data"].as_array().unwrap();
    assert_eq!(rows[0]["action"], "developer.put");
    assert!(
        rows.iter()
            .all(|r| r["actor"] == json!(api::actor(Some(TOKEN)).0))
    );
    let page = api.expect("GET /v1/audit?limit=2", EMPTY, 200, "").await;
    let next = page["next_after"].as_i64().unwrap();
    let rest = api
        .expect(
            &format!("GET /v1/audit?after={next}&limit=1"),
            EMPTY,
            200,
            "",
        )
        .await;
    assert_eq!(rest["data"][0]["seq"], rows[2]["seq"]);
    for bad in ["after=abc", "limit=0", "developer=x"] {
        api.expect(&format!("GET /v1/audit?{bad}"), EMPTY, 400, "invalid")
            .await;
    }

    // Deletes.
    let delete_app = "DELETE /v1/apps/ada-app";
    api.expect(delete_app, big.clone(), 413, "too_large").await;
    assert_eq!(
        api.expect(delete_app, EMPTY, 200, "").await,
        json!({"deleted": true})
    );
    api.expect(delete_app, EMPTY, 404, "not_found").await;
    api.expect(
        "DELETE /v1/apps/weatherapp",
        EMPTY,
        409,
        "defined_in_catalog",
    )
    .await;
    let delete_grace = "DELETE /v1/developers/grace@example.com";
    api.expect(delete_grace, big.clone(), 413, "too_large")
        .await;
    api.expect(delete_grace, EMPTY, 200, "").await;
    api.expect(delete_grace, EMPTY, 404, "not_found").await;
    api.expect("GET /v1/apps/grace-app", EMPTY, 404, "not_found")
        .await;
    let catalog_dev = "DELETE /v1/developers/ntesla@theremin.com";
    api.expect(catalog_dev, EMPTY, 409, "defined_in_catalog")
        .await;

    // Stripe subscriptions: what tollgate believes of a customer; 404 where Stripe does not drive access.
    let seen = Observation::State {
        state: SubscriptionState {
            id: "sub_Ada".into(),
            customer: "cus_Ada".into(),
            status: PaidStatus::PastDue,
            items: vec![PriceItem {
                price: "price_gold".into(),
                lookup_key: Some("gold_monthly".into()),
            }],
            period_start: Some(1_795_000_000),
        },
        as_of: 1_795_000_000_000,
    };
    let observe = Write::Observe {
        customer: "cus_Ada".into(),
        observation: seen,
        source: "evt_test".into(),
        event: None,
    };
    api.store
        .write(&observe, &Actor("test".into()), 1_795_000_000)
        .await
        .unwrap();
    let believed = api
        .expect("GET /v1/subscriptions?customer=cus_Ada", EMPTY, 200, "")
        .await;
    assert_eq!(believed["subscriptions"][0]["status"], "past_due");
    assert!(believed["subscriptions"][0]["access_ends_at"].is_string());
    api.expect("GET /v1/subscriptions", EMPTY, 400, "invalid")
        .await;
    let mut bare = Api::start(false, false).await;
    bare.expect(
        "GET /v1/subscriptions?customer=cus_Ada",
        EMPTY,
        404,
        "not_found",
    )
    .await;

    // Credits: an owner is a company or a developer's e-mail the merged catalog knows (the file's company
    // `theremin`, the store's developer Ada and her company); a grant needs an Idempotency-Key.
    let theremin = "POST /v1/credits/theremin";
    let account = api.expect("GET /v1/credits/theremin", EMPTY, 200, "").await;
    assert_eq!(
        account,
        json!({"owner": "theremin", "balance": 0, "granted": 0, "spent": 0, "reserved": 0,
               "updated_at": null, "grants": []}),
        "a known owner without an account"
    );
    let welcome = json!({"amount": 500, "reason": " welcome "});
    let granted = api
        .expect_keyed(theremin, welcome.clone(), Some("grant-1"), 201, "")
        .await;
    assert_eq!(
        (&granted["balance"], &granted["granted"], &granted["spent"]),
        (&json!(500), &json!(500), &json!(0))
    );
    assert_eq!(granted["grants"][0]["reason"], "welcome", "trimmed");
    assert!(
        granted["grants"][0]["source"]
            .as_str()
            .unwrap()
            .starts_with("api:"),
        "{granted}"
    );
    // The same key and request again: the first answer, replayed; nothing granted twice.
    let again = api.call(theremin, welcome.clone(), Some("grant-1")).await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body, granted, "a replay answers the first answer");
    let back = api
        .expect_keyed(theremin, json!({"amount": -200}), Some("take-1"), 201, "")
        .await;
    assert_eq!(
        (&back["balance"], &back["granted"]),
        (&json!(300), &json!(300))
    );
    let grants: Vec<(&Value, &Value)> = back["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (&g["amount"], &g["reason"]))
        .collect();
    assert_eq!(
        grants,
        [
            (&json!(-200), &json!("take-back")),
            (&json!(500), &json!("welcome"))
        ],
        "newest first"
    );
    // A take-back larger than the balance changes nothing.
    let e = api
        .expect_keyed(
            theremin,
            json!({"amount": -301}),
            Some("take-2"),
            409,
            "conflict",
        )
        .await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("the balance is 300"),
        "{e}"
    );
    // The key with another request.
    api.expect_keyed(
        theremin,
        json!({"amount": 1}),
        Some("grant-1"),
        409,
        "conflict",
    )
    .await;
    // Once the stored answers are gone (kept 24 hours; pruned here), the key still names its grant in the
    // ledger: the retry grants nothing and answers 200 with the balance as it is.
    let tomorrow = chrono::Utc::now().timestamp() + 1;
    api.store.prune(0, tomorrow).await.unwrap();
    let retry = api
        .expect_keyed(theremin, welcome, Some("grant-1"), 200, "")
        .await;
    assert_eq!(
        (&retry["balance"], &retry["granted"]),
        (&json!(300), &json!(300)),
        "granted once"
    );
    assert_eq!(retry["grants"].as_array().unwrap().len(), 2, "{retry}");
    let account = api.expect("GET /v1/credits/theremin", EMPTY, 200, "").await;
    assert_eq!(account, retry);
    // The key with another amount, after its answer is gone too: refused, never a second grant.
    api.expect_keyed(
        theremin,
        json!({"amount": 7}),
        Some("grant-1"),
        409,
        "conflict",
    )
    .await;
    let account = api.expect("GET /v1/credits/theremin", EMPTY, 200, "").await;
    assert_eq!(account["granted"], json!(300));

    let e = api
        .expect(theremin, json!({"amount": 1}), 400, "invalid")
        .await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("Idempotency-Key: "),
        "{e}"
    );
    for (i, (body, field)) in [
        (json!({"amount": 0}), "amount: "),
        (json!({"amount": 1_000_000_000_001_i64}), "amount: "),
        (json!({"amount": -1_000_000_000_001_i64}), "amount: "),
        (json!({"amount": i64::MIN}), "amount: "),
        (json!({"amount": 1.5}), "body: "),
        (json!({"amount": 1, "reason": "x".repeat(129)}), "reason: "),
        (json!({"reason": "no amount"}), "amount: "),
    ]
    .into_iter()
    .enumerate()
    {
        let key = format!("bad-{i}");
        let e = api
            .expect_keyed(theremin, body, Some(&key), 400, "invalid")
            .await;
        assert!(
            e["message"].as_str().unwrap().starts_with(field),
            "{field} {e}"
        );
    }
    api.fields_match_keyed(
        theremin,
        json!({"zz": 1}),
        Some("bad-zz"),
        "CreditGrantInput",
    )
    .await;
    let nobody = "POST /v1/credits/nobody@example.com";
    api.expect_keyed(
        nobody,
        json!({"amount": 1}),
        Some("nobody"),
        404,
        "not_found",
    )
    .await;
    api.expect(
        "GET /v1/credits/nobody@example.com",
        EMPTY,
        404,
        "not_found",
    )
    .await;
    api.expect_keyed(theremin, big, Some("big"), 413, "too_large")
        .await;

    for (owner, amount) in [("ada@example.com", 50), ("Analytical", 20)] {
        let request = format!("POST /v1/credits/{owner}");
        let key = format!("grant-{owner}");
        let body = json!({"amount": amount});
        let got = api.expect_keyed(&request, body, Some(&key), 201, "").await;
        assert_eq!(
            (&got["owner"], &got["balance"]),
            (&json!(owner), &json!(amount))
        );
        assert!(got["updated_at"].is_string(), "{got}");
    }
    // Balances below `below` (default: `credits.low_balance`), by owner, a page at a time.
    let low = api.expect("GET /v1/credits", EMPTY, 200, "").await;
    let owners = |list: &Value| -> Vec<String> {
        let accounts = list["accounts"].as_array().unwrap();
        accounts
            .iter()
            .map(|a| a["owner"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        (low["below"].as_u64(), owners(&low), &low["next_after"]),
        (
            Some(CreditOptions::default().low_balance),
            vec!["Analytical".to_owned(), "ada@example.com".to_owned()],
            &Value::Null
        )
    );
    assert!(low["accounts"][0].get("grants").is_none(), "{low}");
    let page = api
        .expect("GET /v1/credits?below=1000&limit=2", EMPTY, 200, "")
        .await;
    assert_eq!(page["next_after"], "ada@example.com");
    let rest = api
        .expect(
            "GET /v1/credits?below=1000&after=ada@example.com",
            EMPTY,
            200,
            "",
        )
        .await;
    assert_eq!(
        (owners(&rest), &rest["next_after"]),
        (vec!["theremin".to_owned()], &Value::Null)
    );
    let none = api.expect("GET /v1/credits?below=0", EMPTY, 200, "").await;
    assert_eq!(owners(&none), Vec::<String>::new());
    for bad in [
        "below=-1",
        "below=x",
        "limit=x",
        "limit=0",
        "limit=1001",
        "developer=x",
    ] {
        api.expect(&format!("GET /v1/credits?{bad}"), EMPTY, 400, "invalid")
            .await;
    }
    // Where credits are not served, every credits route is a 404.
    for request in ["GET /v1/credits", "GET /v1/credits/theremin"] {
        bare.expect(request, EMPTY, 404, "not_found").await;
    }
    bare.expect_keyed(theremin, json!({"amount": 1}), Some("k"), 404, "not_found")
        .await;
    api.seen.extend(bare.seen);

    // The store goes away: every operation that reads or writes it answers 503.
    api.store.close().await;
    for (method, route) in ROUTES.iter().filter(|(_, r)| *r != "/v1/openapi.json") {
        let (body, key) = match (*method, *route) {
            ("PUT", "/v1/apps/{app}") => (ada_dev.clone(), None),
            ("PUT", "/v1/apps/{app}/products/{product}") => (approve.clone(), None),
            ("POST", "/v1/credits/{owner}") => (json!({"amount": 1}), Some("grant-503")),
            _ => (EMPTY, None),
        };
        let request = format!("{method} {}", instance(route));
        api.expect_keyed(&request, body, key, 503, "unavailable")
            .await;
    }

    // Every documented status was answered.
    let mut documented = BTreeSet::new();
    for (method, route) in operations(&doc) {
        for status in operation(&doc, &method, &route)["responses"]
            .as_object()
            .unwrap()
            .keys()
        {
            documented.insert((
                method.clone(),
                route.clone(),
                status.parse::<u16>().unwrap(),
            ));
        }
    }
    let never: Vec<_> = documented.difference(&api.seen).collect();
    assert!(never.is_empty(), "documented but never answered: {never:?}");
}

fn validate(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let Some(schema) = schema.as_object() else {
        return Err(format!("{at}: schema {schema} is not an object"));
    };
    let fail = |what: String| Err(format!("{at}: {what} (value {value})"));
    for (keyword, arg) in schema {
        match keyword.as_str() {
            "$ref" => validate(doc, resolve(doc, &json!({"$ref": arg})), value, at)?,
            "type" => {
                let types: Vec<&str> = match arg {
                    Value::Array(types) => types.iter().filter_map(Value::as_str).collect(),
                    other => other.as_str().into_iter().collect(),
                };
                let fits = |t: &str| match t {
                    "object" => value.is_object(),
                    "array" => value.is_array(),
                    "string" => value.is_string(),
                    "integer" => value.is_i64() || value.is_u64(),
                    "number" => value.is_number(),
                    "boolean" => value.is_boolean(),
                    "null" => value.is_null(),
                    other => panic!("unknown type {other}"),
                };
                if !types.into_iter().any(fits) {
                    return fail(format!("not of type {arg}"));
                }
            }
            "const" if value != arg => return fail(format!("not {arg}")),
            "enum" if !arg.as_array().unwrap().contains(value) => {
                return fail(format!("not one of {arg}"));
            }
            "required" => {
                for name in arg.as_array().unwrap() {
                    if value.is_object() && value.get(name.as_str().unwrap()).is_none() {
                        return fail(format!("lacks {name}"));
                    }
                }
            }
            "properties" => {
                for (name, sub) in arg.as_object().unwrap() {
                    if let Some(v) = value.get(name).filter(|_| value.is_object()) {
                        validate(doc, sub, v, &format!("{at}.{name}"))?;
                    }
                }
            }
            "additionalProperties" => {
                let known = schema.get("properties").and_then(Value::as_object);
                for (name, v) in value.as_object().into_iter().flatten() {
                    if known.is_some_and(|k| k.contains_key(name)) {
                        continue;
                    }
                    match arg {
                        Value::Bool(false) => return fail(format!("has unknown property {name}")),
                        Value::Bool(true) => {}
                        sub => validate(doc, sub, v, &format!("{at}.{name}"))?,
                    }
                }
            }
            "items" => {
                for (i, v) in value.as_array().into_iter().flatten().enumerate() {
                    validate(doc, arg, v, &format!("{at}[{i}]"))?;
                }
            }
            "allOf" => {
                for sub in arg.as_array().unwrap() {
                    validate(doc, sub, value, at)?;
                }
            }
            "oneOf" => {
                let results: Vec<_> = arg
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| validate(doc, s, value, at))
                    .collect();
                if results.iter().filter(|r| r.is_ok()).count() != 1 {
                    return fail(format!("not exactly one of oneOf: {results:?}"));
                }
            }
            "maxProperties"
                if value
                    .as_object()
                    .is_some_and(|o| o.len() as u64 > arg.as_u64().unwrap()) =>
            {
                return fail(format!("more than {arg} properties"));
            }
            "minimum" | "maximum" | "minLength" | "maxLength" => {
                let bound = arg.as_f64().unwrap();
                let (n, low) = match keyword.as_str() {
                    "minimum" => (value.as_f64(), true),
                    "maximum" => (value.as_f64(), false),
                    "minLength" => (value.as_str().map(|s| s.chars().count() as f64), true),
                    _ => (value.as_str().map(|s| s.chars().count() as f64), false),
                };
                if n.is_some_and(|n| if low { n < bound } else { n > bound }) {
                    return fail(format!("violates {keyword} {arg}"));
                }
            }
            "format" if arg == "date-time" => {
                if let Some(s) = value.as_str()
                    && chrono::DateTime::parse_from_rfc3339(s).is_err()
                {
                    return fail("not an RFC 3339 date-time".to_owned());
                }
            }
            // Annotations, and the constraints this validator leaves to the server's own checks.
            "description" | "default" | "examples" | "pattern" | "propertyNames" => {}
            "not" if validate(doc, arg, value, at).is_ok() => {
                return fail(format!("matches the schema `not` refuses: {arg}"));
            }
            "const" | "enum" | "maxProperties" | "not" => {}
            other => {
                panic!("{at}: the validator does not know {other:?}: teach it before using it")
            }
        }
    }
    Ok(())
}
