//! `tollgate import apigee` as an operator runs it: the Edge and X fixture sets (tests/fixtures/apigee) through
//! the built binary, the stderr report line by line, the catalog's important parts, `tollgate check` on the
//! result, byte-for-byte determinism, and that no consumer key or secret ever leaves the input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};
use tollgate::identity::api_key::KeyHash;

fn fixture(set: &str, file: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/apigee")
        .join(set)
        .join(file)
        .display()
        .to_string()
}

fn tollgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .expect("run tollgate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("UTF-8 output")
}

/// Runs an import that must succeed; returns (catalog YAML, stderr lines).
fn import(args: &[&str]) -> (String, Vec<String>) {
    let mut all = vec!["import", "apigee"];
    all.extend_from_slice(args);
    let out = tollgate(&all);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "import failed: {stderr}");
    (
        text(&out.stdout),
        stderr.lines().map(str::to_owned).collect(),
    )
}

fn edge_args() -> Vec<String> {
    vec![
        "--products".into(),
        fixture("edge", "products.json"),
        "--developers".into(),
        fixture("edge", "developers.json"),
        "--apps".into(),
        fixture("edge", "apps.json"),
        "--companies".into(),
        fixture("edge", "companies.json"),
    ]
}

fn x_args() -> Vec<String> {
    vec![
        "--products".into(),
        fixture("x", "products.json"),
        "--developers".into(),
        fixture("x", "developers.json"),
        "--apps".into(),
        fixture("x", "apps.json"),
        "--base-path".into(),
        "weatherapi=/v1/weather".into(),
    ]
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The catalog as JSON, for comparing parts of it.
fn parsed(yaml: &str) -> Value {
    serde_yaml_ng::from_str(yaml).expect("the import writes YAML")
}

fn product<'a>(catalog: &'a Value, name: &str) -> &'a Value {
    catalog["products"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no product {name} in {catalog}"))
}

fn app<'a>(catalog: &'a Value, name: &str) -> &'a Value {
    catalog["developers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|d| d["apps"].as_array().into_iter().flatten())
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no app {name} in {catalog}"))
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().or(v["email"].as_str()))
        .collect()
}

fn hash(key: &str) -> String {
    KeyHash::of(key).to_string()
}

/// Asserts the report: one line per expected prefix, in order, then the summary line.
fn assert_report(lines: &[String], expected: &[&str]) {
    let shown = lines.join("\n");
    assert_eq!(
        lines.len(),
        expected.len(),
        "report has {} lines, expected {}:\n{shown}",
        lines.len(),
        expected.len()
    );
    for (line, want) in lines.iter().zip(expected) {
        assert!(
            line.starts_with(want),
            "line {line:?} should start with {want:?}; report:\n{shown}"
        );
    }
}

/// Every consumerKey and consumerSecret of a fixture file.
fn secrets(file: &str) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    if (k == "consumerKey" || k == "consumerSecret")
                        && let Some(s) = v.as_str()
                    {
                        out.push(s.to_owned());
                    }
                    walk(v, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(file).expect("fixture"))
        .expect("fixture JSON");
    let mut out = Vec::new();
    walk(&doc, &mut out);
    assert!(!out.is_empty(), "{file} has credentials");
    out
}

/// Writes `catalog` next to a minimal config and runs `tollgate check` on it.
fn check(dir: &Path, catalog: &str) -> Output {
    let config = dir.join("tollgate.yaml");
    std::fs::write(&config, "catalog: {path: catalog.yaml}\n").expect("write config");
    std::fs::write(dir.join("catalog.yaml"), catalog).expect("write catalog");
    tollgate(&["check", "--config", &config.display().to_string()])
}

fn assert_checks(catalog: &str, summary_lines: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = check(dir.path(), catalog);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "tollgate check refused the import: {}\n{catalog}",
        text(&out.stderr)
    );
    for line in summary_lines {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
}

#[test]
fn the_edge_export_imports_reports_what_it_cannot_map_and_passes_check() {
    let args = edge_args();
    let (yaml, report) = import(&refs(&args));
    assert_report(
        &report,
        &[
            "note: API weatherapi: no --base-path weatherapi=<proxy base path>: its resources are used as request paths",
            "warning: product weather_premium: attribute MINT_TRANSACTION_SUCCESS_CRITERIA (monetization) is not mapped",
            "note: product weather_premium: proxy remote-service is Apigee's Envoy adapter, not an API: not imported",
            "warning: product weather_bulk: product quota time unit \"fortnight\" is not second, minute, hour, day, week or month: imported without this quota",
            "warning: product weather_bulk: resource \"/bulk*\" of API weatherapi: path pattern segment 'bulk*' mixes a wildcard",
            "warning: product internal_beta: it is bound to no environment, so Apigee's Envoy adapter grants it nowhere: not imported",
            "warning: developer ntesla@theremin.com: attribute MINT_BILLING_TYPE (monetization) is not mapped",
            "warning: developer ntesla@theremin.com: attribute MINT_DEVELOPER_TYPE (monetization) is not mapped",
            "warning: company acmecorp: attribute MINT_BILLING_TYPE (monetization) is not mapped",
            "note: app multikey (developer ada@lovelace.test), credential 2: its scopes are not mapped",
            "note: app multikey (developer ada@lovelace.test): its credentials hold different products, so it is split in 2 apps that give each key exactly its own products: multikey~1 (weather_free approved); multikey~2 (weather_free approved, weather_premium approved); Apigee counts a product's quota per app, the pieces count weather_free each on their own",
            "note: app dormant-app (developer gone@dormant.test): its developer is inactive, so Apigee refuses its keys: imported revoked",
            "warning: app acme-dashboard (company acmecorp): product internal_beta was not imported (it is bound to no environment",
            "warning: app acme-dashboard (company acmecorp): product retired_product is not in the products file: its keys do not get it",
            "note: app weatherapp (developer ntesla@theremin.com): renamed weatherapp to ntesla@theremin.com+weatherapp",
            "note: app weatherapp (developer ada@lovelace.test): renamed weatherapp to ada@lovelace.test+weatherapp",
            "imported 4 products, 4 developers, 6 apps, 8 keys; 9 warnings, 7 notes",
        ],
    );

    let c = parsed(&yaml);
    assert_eq!(
        names(&c["products"]),
        vec![
            "weather_bulk",
            "weather_free",
            "weather_premium",
            "weather_unlimited"
        ]
    );
    let free = product(&c, "weather_free");
    assert_eq!(free["display_name"], "Weather Free");
    assert_eq!(free["environments"], json!(["test", "prod"]));
    assert_eq!(free["approval"], "auto");
    assert_eq!(
        free["quota"],
        json!({"limit": 100, "interval": 1, "unit": "day"})
    );
    assert_eq!(free["attributes"], json!({"access": "public"}));
    assert!(free.get("scopes").is_none(), "Apigee's [\"\"] is no scope");
    assert_eq!(
        free["operations"],
        json!([{"name": "weatherapi", "api": "weatherapi", "paths": ["/forecastrss", "/forecastrss/**"]}])
    );
    let premium = product(&c, "weather_premium");
    assert_eq!(premium["approval"], "manual");
    assert_eq!(premium["scopes"], json!(["read", "write"]));
    assert_eq!(
        premium["quota"],
        json!({"limit": 1000, "interval": 1, "unit": "month"})
    );
    // The adapter's targets become APIs; its own proxy and the monetization attribute do not.
    assert_eq!(
        premium["operations"],
        json!([
            {"name": "weatherapi", "api": "weatherapi", "paths": ["/"]},
            {"name": "httpbin.org", "api": "httpbin.org", "paths": ["/"]}
        ])
    );
    assert_eq!(premium["attributes"], json!({"access": "private"}));
    assert!(product(&c, "weather_unlimited").get("quota").is_none());
    assert_eq!(
        product(&c, "weather_bulk")["operations"][0]["paths"],
        json!(["/bulk/**"])
    );

    assert_eq!(
        names(&c["developers"]),
        vec![
            "acmecorp",
            "ada@lovelace.test",
            "gone@dormant.test",
            "ntesla@theremin.com"
        ]
    );
    assert_eq!(c["developers"][3]["company"], "theremin");
    assert_eq!(c["developers"][0]["company"], "acmecorp");

    let tesla = app(&c, "ntesla@theremin.com+weatherapp");
    assert_eq!(tesla["status"], "approved");
    assert_eq!(
        tesla["products"],
        json!([
            {"name": "weather_free", "status": "approved"},
            {"name": "weather_premium", "status": "pending"},
            {"name": "weather_unlimited", "status": "revoked"}
        ])
    );
    let key = |k: &str| {
        tesla["keys"]
            .as_array()
            .and_then(|ks| ks.iter().find(|x| x["hash"] == hash(k)))
            .unwrap_or_else(|| panic!("no key for {k} in {tesla}"))
            .clone()
    };
    assert_eq!(
        key("EdgeKeyNteslaGood0000000000000001"),
        json!({"hash": hash("EdgeKeyNteslaGood0000000000000001"), "status": "approved"})
    );
    assert_eq!(
        key("EdgeKeyNteslaRevoked0000000000002")["status"],
        "revoked"
    );
    assert_eq!(
        key("EdgeKeyNteslaExpired0000000000003")["expires_at"],
        "2020-01-01T00:00:00Z"
    );
    assert_eq!(
        app(&c, "ada@lovelace.test+weatherapp")["keys"][0]["expires_at"],
        "2027-01-01T00:00:00Z"
    );
    // The split: each key keeps exactly the products its credential has.
    let one = app(&c, "multikey~1");
    assert_eq!(
        one["products"],
        json!([{"name": "weather_free", "status": "approved"}])
    );
    assert_eq!(
        one["keys"][0]["hash"],
        hash("EdgeKeyAdaMultiFree00000000000005")
    );
    let two = app(&c, "multikey~2");
    assert_eq!(two["products"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        two["keys"][0]["hash"],
        hash("EdgeKeyAdaMultiBoth00000000000006")
    );
    assert_eq!(app(&c, "dormant-app")["status"], "revoked");
    assert_eq!(
        app(&c, "acme-dashboard")["products"],
        json!([{"name": "weather_premium", "status": "approved"}])
    );

    let stderr = report.join("\n");
    for secret in secrets(&fixture("edge", "apps.json")) {
        assert!(
            !yaml.contains(&secret),
            "the catalog holds a consumer key or secret"
        );
        assert!(
            !stderr.contains(&secret),
            "the report holds a consumer key or secret"
        );
    }
    assert_checks(
        &yaml,
        &[
            "products  4",
            "developers 4, apps 6 (1 revoked)",
            "keys      8 (6 usable, 1 revoked, 1 expired)",
        ],
    );
}

#[test]
fn the_x_export_maps_operation_groups_quotas_and_attributes_and_passes_check() {
    let args = x_args();
    let (yaml, report) = import(&refs(&args));
    assert_report(
        &report,
        &[
            "note: product weather-basic: 2 operationConfigs share API weatherapi: where their resources overlap, Apigee's Envoy adapter charges every matching one's quota, tollgate only the first operation's",
            "warning: product weather-premium: quotaCounterScope is not mapped",
            "warning: product geo-remote, operationConfig 1 (geo.example.test): resource \"/v*/status\": path pattern segment 'v*' mixes a wildcard",
            "warning: product weather-graphql: graphqlOperationGroup is not mapped",
            "warning: product weather-graphql: its only operations are GraphQL or gRPC ones: not imported",
            "note: app split-client (developer partner@example.test): its credentials hold different products, so it is split in 2 apps that give each key exactly its own products: split-client~1 (geo-remote approved, weather-basic approved); split-client~2 (weather-basic approved)",
            "note: app sleepy-app (developer sleepy@example.test): its developer is inactive, so Apigee refuses its keys: imported revoked",
            "imported 3 products, 2 developers, 4 apps, 6 keys; 4 warnings, 3 notes",
        ],
    );
    let c = parsed(&yaml);
    assert_eq!(
        names(&c["products"]),
        vec!["geo-remote", "weather-basic", "weather-premium"]
    );
    let basic = product(&c, "weather-basic");
    assert_eq!(
        basic["quota"],
        json!({"limit": 5, "interval": 1, "unit": "day"})
    );
    let reports_quota = json!({"limit": 3, "interval": 1, "unit": "day"});
    assert_eq!(
        basic["operations"],
        json!([
            {"name": "weatherapi#1", "api": "weatherapi",
             "paths": ["/v1/weather/forecast", "/v1/weather/forecast/**"], "methods": ["GET"]},
            {"name": "weatherapi#2 GET", "api": "weatherapi",
             "paths": ["/v1/weather/reports", "/v1/weather/reports/**"], "methods": ["GET"],
             "quota": reports_quota, "quota_group": "weatherapi#2", "attributes": {"tier": "reports"}},
            {"name": "weatherapi#2 POST", "api": "weatherapi",
             "paths": ["/v1/weather/reports"], "methods": ["POST"],
             "quota": reports_quota, "quota_group": "weatherapi#2", "attributes": {"tier": "reports"}}
        ])
    );
    let premium = product(&c, "weather-premium");
    assert_eq!(premium["approval"], "manual");
    assert_eq!(premium["scopes"], json!(["premium.read"]));
    assert_eq!(
        premium["operations"],
        json!([{"name": "weatherapi", "api": "weatherapi", "paths": ["/v1/weather/premium/**"],
                "attributes": {"deprecated": "false"}}])
    );
    // A remote service target is matched on the request path: no base path.
    assert_eq!(
        product(&c, "geo-remote")["operations"],
        json!([{"name": "geo.example.test", "api": "geo.example.test", "paths": ["/cities"], "methods": ["GET"]}])
    );
    let client = app(&c, "weather-client");
    assert_eq!(
        client["products"],
        json!([
            {"name": "geo-remote", "status": "approved"},
            {"name": "weather-basic", "status": "approved"},
            {"name": "weather-premium", "status": "pending"}
        ])
    );
    assert_eq!(client["keys"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        app(&c, "split-client~1")["keys"][0]["hash"],
        hash("XKeySplitWithGeo0123456789abcdefghijklmnopqrstu")
    );
    assert_eq!(
        app(&c, "split-client~2")["keys"][0]["hash"],
        hash("XKeySplitBasicOnly0123456789abcdefghijklmnopqrs")
    );
    assert_eq!(app(&c, "sleepy-app")["status"], "revoked");
    let stderr = report.join("\n");
    for secret in secrets(&fixture("x", "apps.json")) {
        assert!(!yaml.contains(&secret) && !stderr.contains(&secret));
    }
    assert_checks(
        &yaml,
        &[
            "weather-basic            3 operations, quota 5/day, environments prod",
            "keys      6 (4 usable, 1 revoked, 1 expired)",
        ],
    );
}

#[test]
fn the_same_export_gives_the_same_bytes_on_stdout_and_in_output() {
    let args = x_args();
    let (first, _) = import(&refs(&args));
    let (second, _) = import(&refs(&args));
    assert_eq!(first, second);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("catalog.yaml");
    let mut with_output = args.clone();
    with_output.extend(["--output".to_owned(), file.display().to_string()]);
    let (stdout, report) = import(&refs(&with_output));
    assert!(stdout.is_empty(), "--output writes nothing to stdout");
    assert!(!report.is_empty());
    assert_eq!(std::fs::read_to_string(&file).expect("output file"), first);
}

#[test]
fn environment_flags_select_and_rename_environments() {
    let mut args = x_args();
    args.extend(["--environment", "test", "--environment-map", "test=staging"].map(str::to_owned));
    let (yaml, report) = import(&refs(&args));
    let c = parsed(&yaml);
    assert_eq!(names(&c["products"]), vec!["geo-remote"]);
    assert_eq!(
        product(&c, "geo-remote")["environments"],
        json!(["prod", "staging"])
    );
    assert!(
        report.iter().any(|l| l
            == "warning: product weather-basic: it is not bound to environment test (--environment): not imported"),
        "{report:?}"
    );
    assert!(report.iter().any(|l| l.starts_with(
        "warning: app weather-client (developer partner@example.test): product weather-basic was not imported"
    )));
    assert_checks(&yaml, &["products  1"]);
}

#[test]
fn unreadable_input_fails_with_one_sentence_and_no_catalog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("apps.json");
    std::fs::write(
        &broken,
        "{\"app\": [\n  {\"name\": \"a\", \"credentials\": []},\n  {\"name\": \"b\",}\n]}\n",
    )
    .expect("write");
    let products = fixture("x", "products.json");
    let developers = fixture("x", "developers.json");
    let broken_path = broken.display().to_string();
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--products", &products, "--apps", &broken_path],
            format!("tollgate: {broken_path}:3:16: trailing comma (the file is not valid JSON)"),
        ),
        (
            vec!["--products", &products, "--apps", &developers],
            format!(
                "tollgate: {developers}: this is a listing of developers, not of apps: check --apps and --developers"
            ),
        ),
        (
            vec!["--products", "/nonexistent/products.json"],
            "tollgate: cannot read /nonexistent/products.json: No such file or directory (os error 2)"
                .to_owned(),
        ),
        (
            vec!["--products", &products, "--base-path", "weatherapi=v1"],
            "tollgate: --base-path weatherapi: base path \"v1\" must start with '/'".to_owned(),
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["import", "apigee"];
        all.extend(args);
        let out = tollgate(&all);
        assert_eq!(out.status.code(), Some(1), "{all:?}");
        assert!(out.stdout.is_empty(), "no catalog on failure: {all:?}");
        assert_eq!(text(&out.stderr), format!("{want}\n"), "{all:?}");
    }
}

#[test]
fn products_alone_make_a_catalog_and_help_names_every_flag() {
    let products = fixture("x", "products.json");
    let (yaml, _) = import(&["--products", &products]);
    let c = parsed(&yaml);
    assert_eq!(c["developers"], json!([]));
    assert_checks(&yaml, &["products  3"]);
    let help = text(&tollgate(&["import", "apigee", "--help"]).stdout);
    for flag in [
        "--products",
        "--developers",
        "--apps",
        "--companies",
        "--base-path",
        "--environment",
        "--environment-map",
        "--output",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}
