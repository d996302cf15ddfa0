//! API products → catalog products, with the semantics of apigee-remote-service-golib (`product/product.go`,
//! v2.1.x), the library behind Apigee's Envoy adapter.
//!
//! - An `operationGroup` overrides the legacy `proxies` + `apiResources` (golib's `authorize`).
//! - An operationConfig without a quota (or with limit 0) charges the product quota: one counter per product,
//!   which is what a catalog operation without `quota` does. One with a quota has one counter for all its
//!   operations (golib's id `product-env-developer-app-<operationConfig id>`): each catalog operation made
//!   from it carries the quota, and a `quota_group` when there are several of them.
//! - A legacy product covers its `proxies` and the Envoy adapter's targets (the comma-separated
//!   `apigee-remote-service-targets` attribute), each with every `apiResources` path (none: `/`).
//! - Resources are relative to the proxy's base path; `--base-path` prefixes them, without it they are
//!   request paths, as the Envoy adapter matches them.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::Settings;
use super::model::{ApiProduct, Attribute, OperationConfig, Quota};
use super::output::{Limit, Operation, Product};
use super::report::Report;
use crate::matching::path::PathPattern;

/// The product attribute that lists the Envoy adapter's targets (golib's `TargetsAttr`).
pub const TARGETS_ATTRIBUTE: &str = "apigee-remote-service-targets";

/// The proxy Apigee's Envoy adapter installs to verify keys; it is not an API that products sell.
const ADAPTER_PROXY: &str = "remote-service";

/// Product fields that only record who changed what and when.
const BOOKKEEPING: &[&str] = &[
    "createdAt",
    "createdBy",
    "lastModifiedAt",
    "lastModifiedBy",
    "description",
    "space",
];

/// The products an import keeps, and why the others were left out.
#[derive(Debug, Default)]
pub struct Products {
    /// Catalog products, by name.
    pub list: Vec<Product>,
    /// Products of the input that are not in the catalog, with the reason, by name.
    pub skipped: BTreeMap<String, String>,
    /// The names in `list`, for lookups per credential.
    names: BTreeSet<String>,
}

impl Products {
    /// Whether the catalog has this product.
    pub fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}

/// Converts every product; what cannot be mapped goes to `report`.
pub fn convert(input: Vec<ApiProduct>, settings: &Settings, report: &mut Report) -> Products {
    let mut out = Products::default();
    let mut seen_apis = BTreeSet::new();
    let mut noted_bases = BTreeSet::new();
    for p in input {
        let name = p.name.trim().to_owned();
        let entity = format!("product {name}");
        if name.is_empty() {
            report.warn(
                "product (no name)",
                "a product without a name: not imported",
            );
            continue;
        }
        if out.has(&name) || out.skipped.contains_key(&name) {
            report.warn(
                entity,
                "listed twice in the products file: the first one is imported",
            );
            continue;
        }
        let mut ctx = Context {
            entity: &entity,
            settings,
            report,
            noted_bases: &mut noted_bases,
            seen_apis: &mut seen_apis,
        };
        match ctx.product(&name, p) {
            Ok(product) => {
                out.names.insert(product.name.clone());
                out.list.push(product);
            }
            Err(reason) => {
                ctx.report
                    .warn(entity.clone(), format!("{reason}: not imported"));
                out.skipped.insert(name, reason);
            }
        }
    }
    for api in settings.base_paths.keys() {
        if !seen_apis.contains(api) {
            report.warn(
                format!("--base-path {api}"),
                "no imported product uses this API: check its spelling",
            );
        }
    }
    out.list.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

struct Context<'a> {
    entity: &'a str,
    settings: &'a Settings,
    report: &'a mut Report,
    noted_bases: &'a mut BTreeSet<String>,
    seen_apis: &'a mut BTreeSet<String>,
}

impl Context<'_> {
    fn warn(&mut self, message: impl Into<String>) {
        self.report.warn(self.entity, message);
    }

    /// One product, or why it cannot be imported.
    fn product(&mut self, name: &str, p: ApiProduct) -> Result<Product, String> {
        let environments = self.environments(&p.environments)?;
        let approval = match p.approval_type.as_deref().map(str::trim) {
            None | Some("") => "auto",
            Some(a) if a.eq_ignore_ascii_case("auto") => "auto",
            Some(a) if a.eq_ignore_ascii_case("manual") => "manual",
            Some(other) => {
                self.warn(format!(
                    "approvalType {other:?} is neither auto nor manual: imported as manual"
                ));
                "manual"
            }
        };
        let mut scopes: Vec<String> = Vec::new();
        for s in p.scopes.iter().map(|s| s.trim()) {
            // Apigee returns "no scopes" as [""] (golib drops it too).
            if !s.is_empty() && !scopes.iter().any(|x| x == s) {
                scopes.push(s.to_owned());
            }
        }
        let quota = limit(
            self.entity,
            "product quota",
            &Quota {
                limit: p.quota.clone(),
                interval: p.quota_interval.clone(),
                time_unit: p.quota_time_unit.clone(),
            },
            self.report,
        );
        let mut targets = None;
        let attributes = attributes(self.entity, &p.attributes, self.report, Some(&mut targets));
        self.other_fields(&p.other);
        let other_groups = p.other.iter().any(|(k, v)| {
            let k = k.to_ascii_lowercase();
            (k.contains("graphql") || k.contains("grpc")) && !is_empty(v)
        });

        let operations = match &p.operation_group {
            Some(group) if !group.operation_configs.is_empty() => {
                if !p.proxies.iter().all(|x| x.trim().is_empty())
                    || !p.api_resources.iter().all(|x| x.trim().is_empty())
                {
                    self.warn(
                        "proxies and apiResources are ignored: its operationGroup takes precedence, as in Apigee",
                    );
                }
                if targets.is_some() {
                    self.warn(format!(
                        "attribute {TARGETS_ATTRIBUTE} is ignored: its operationGroup takes precedence, as in Apigee"
                    ));
                }
                for field in group.other.keys() {
                    self.warn(format!("operationGroup field {field} is not mapped"));
                }
                let remote = group
                    .operation_config_type
                    .as_deref()
                    .is_some_and(|t| t.eq_ignore_ascii_case("remoteservice"));
                self.operation_configs(&group.operation_configs, remote)
            }
            Some(_) => {
                self.report.note(
                    self.entity,
                    "its operationGroup has no operationConfigs: its proxies and apiResources are imported",
                );
                self.legacy(
                    &p.proxies,
                    targets.as_deref(),
                    &p.api_resources,
                    other_groups,
                )?
            }
            None => self.legacy(
                &p.proxies,
                targets.as_deref(),
                &p.api_resources,
                other_groups,
            )?,
        };
        if operations.is_empty() {
            return Err(
                "none of its operations could be mapped, so it would cover no request".into(),
            );
        }
        Ok(Product {
            name: name.to_owned(),
            display_name: p
                .display_name
                .map(|d| d.trim().to_owned())
                .filter(|d| !d.is_empty()),
            environments,
            approval,
            scopes,
            quota,
            attributes,
            operations,
        })
    }

    /// The product's environments, renamed by `--environment-map`; an error when it is left out.
    fn environments(&mut self, input: &[String]) -> Result<Vec<String>, String> {
        let apigee: Vec<&str> = input
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .collect();
        if apigee.is_empty() {
            // golib authorizes a product only in the environments it lists; tollgate would read an
            // empty list as every environment, so importing it would grant what Apigee does not.
            return Err(
                "it is bound to no environment, so Apigee's Envoy adapter grants it nowhere".into(),
            );
        }
        if let Some(only) = &self.settings.environment
            && !apigee.contains(&only.as_str())
        {
            return Err(format!(
                "it is not bound to environment {only} (--environment)"
            ));
        }
        let mut out: Vec<String> = Vec::new();
        for e in apigee {
            let mapped = self
                .settings
                .environment_map
                .get(e)
                .map_or(e, String::as_str);
            if !out.iter().any(|x| x == mapped) {
                out.push(mapped.to_owned());
            }
        }
        Ok(out)
    }

    fn other_fields(&mut self, other: &BTreeMap<String, Value>) {
        for (field, value) in other {
            if BOOKKEEPING.contains(&field.as_str()) || is_empty(value) {
                continue;
            }
            let lower = field.to_ascii_lowercase();
            let message = if lower.contains("rateplan") {
                format!(
                    "{field} (rate plans) is not mapped: tollgate sells products through Stripe prices (stripe_prices)"
                )
            } else if lower.contains("graphql") || lower.contains("grpc") {
                format!(
                    "{field} is not mapped: tollgate covers HTTP operations (paths and methods) only"
                )
            } else if field == "quotaCounterScope" {
                format!(
                    "{field} is not mapped: operations without a quota of their own share the product's counter, as Apigee's Envoy adapter counts them"
                )
            } else if lower.contains("monetization") {
                format!("{field} (monetization) is not mapped")
            } else {
                format!("field {field} is not mapped")
            };
            self.warn(message);
        }
    }

    /// X products: each operationConfig becomes one operation per distinct method set.
    fn operation_configs(&mut self, configs: &[OperationConfig], remote: bool) -> Vec<Operation> {
        let mut per_api: BTreeMap<&str, usize> = BTreeMap::new();
        for oc in configs {
            *per_api.entry(oc.api_source.trim()).or_default() += 1;
        }
        for (api, n) in &per_api {
            if *n > 1 && !api.is_empty() {
                self.report.note(
                    self.entity,
                    format!(
                        "{n} operationConfigs share API {api}: where their resources overlap, Apigee's Envoy adapter charges every matching one's quota, tollgate only the first operation's"
                    ),
                );
            }
        }
        let mut occurrence: BTreeMap<&str, usize> = BTreeMap::new();
        let mut operations = Vec::new();
        for (i, oc) in configs.iter().enumerate() {
            let api = oc.api_source.trim();
            let entity = format!("{}, operationConfig {} ({api})", self.entity, i + 1);
            if api.is_empty() {
                self.report
                    .warn(entity, "it has no apiSource: not imported");
                continue;
            }
            self.seen_apis.insert(api.to_owned());
            let k = occurrence.entry(api).or_default();
            *k += 1;
            // A readable name, unique in the product: `#` never occurs in Apigee proxy or target names.
            let base = if per_api.get(api).copied().unwrap_or(0) > 1 {
                format!("{api}#{k}")
            } else {
                api.to_owned()
            };
            let ops = self.operation_config(&entity, api, &base, oc, remote);
            operations.extend(ops);
        }
        operations
    }

    fn operation_config(
        &mut self,
        entity: &str,
        api: &str,
        base: &str,
        oc: &OperationConfig,
        remote: bool,
    ) -> Vec<Operation> {
        for (field, value) in &oc.other {
            if !is_empty(value) {
                self.report
                    .warn(entity, format!("field {field} is not mapped"));
            }
        }
        if oc.operations.is_empty() {
            self.report.warn(
                entity,
                "it lists no operations, so Apigee's Envoy adapter grants nothing through it: not imported",
            );
            return Vec::new();
        }
        let base_path = self.base_path(api, !remote);
        // Operations with the same method set merge into one catalog operation, in first-seen order.
        let mut groups: Vec<(Vec<String>, Vec<String>)> = Vec::new();
        for op in &oc.operations {
            let methods = match methods(&op.methods) {
                Ok(m) => m,
                Err(message) => {
                    self.report.warn(
                        entity,
                        format!("resource {:?}: {message}: not imported", op.resource),
                    );
                    continue;
                }
            };
            let paths = match resource_paths(base_path.as_deref(), &op.resource) {
                Ok(p) => p,
                Err(message) => {
                    self.report.warn(
                        entity,
                        format!("resource {:?}: {message}: not imported", op.resource),
                    );
                    continue;
                }
            };
            let slot = match groups.iter().position(|(m, _)| *m == methods) {
                Some(i) => i,
                None => {
                    groups.push((methods, Vec::new()));
                    groups.len() - 1
                }
            };
            for path in paths {
                if !groups[slot].1.contains(&path) {
                    groups[slot].1.push(path);
                }
            }
        }
        let quota = oc
            .quota
            .as_ref()
            .and_then(|q| limit(entity, "operationConfig quota", q, self.report));
        let attributes = attributes(entity, &oc.attributes, self.report, None);
        let several = groups.len() > 1;
        groups
            .into_iter()
            .map(|(methods, paths)| Operation {
                name: if several {
                    let m = if methods.is_empty() {
                        "ANY".to_owned()
                    } else {
                        methods.join(",")
                    };
                    format!("{base} {m}")
                } else {
                    base.to_owned()
                },
                api: api.to_owned(),
                paths,
                methods,
                quota,
                // One operationConfig, one counter: golib keys it by the operationConfig.
                quota_group: (several && quota.is_some()).then(|| base.to_owned()),
                attributes: attributes.clone(),
            })
            .collect()
    }

    /// Edge products: one operation per API, each with every resource.
    fn legacy(
        &mut self,
        proxies: &[String],
        targets: Option<&str>,
        resources: &[String],
        other_groups: bool,
    ) -> Result<Vec<Operation>, String> {
        let mut apis: Vec<(String, bool)> = Vec::new();
        for proxy in proxies.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            if proxy == ADAPTER_PROXY {
                self.report.note(
                    self.entity,
                    format!(
                        "proxy {ADAPTER_PROXY} is Apigee's Envoy adapter, not an API: not imported"
                    ),
                );
                continue;
            }
            if !apis.iter().any(|(a, _)| a == proxy) {
                apis.push((proxy.to_owned(), true));
            }
        }
        for target in targets
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            if !apis.iter().any(|(a, _)| a == target) {
                apis.push((target.to_owned(), false));
            }
        }
        if apis.is_empty() {
            return Err(if other_groups {
                "its only operations are GraphQL or gRPC ones".into()
            } else if proxies.iter().any(|p| p.trim() == ADAPTER_PROXY) {
                format!(
                    "it lists only the {ADAPTER_PROXY} proxy and no {TARGETS_ATTRIBUTE} attribute, so it names no API"
                )
            } else {
                "it lists no API proxies (Apigee Edge then grants every proxy of the organization, which a catalog cannot express)".into()
            });
        }
        let resources: Vec<&str> = {
            let listed: Vec<&str> = resources
                .iter()
                .map(|r| r.trim())
                .filter(|r| !r.is_empty())
                .collect();
            if listed.is_empty() { vec!["/"] } else { listed }
        };
        let mut operations = Vec::new();
        for (api, is_proxy) in apis {
            self.seen_apis.insert(api.clone());
            let base_path = self.base_path(&api, is_proxy);
            let mut paths: Vec<String> = Vec::new();
            for resource in &resources {
                match resource_paths(base_path.as_deref(), resource) {
                    Ok(ps) => {
                        for p in ps {
                            if !paths.contains(&p) {
                                paths.push(p);
                            }
                        }
                    }
                    Err(message) => self.report.warn(
                        self.entity,
                        format!("resource {resource:?} of API {api}: {message}: not imported"),
                    ),
                }
            }
            if paths.is_empty() {
                continue;
            }
            operations.push(Operation {
                name: api.clone(),
                api,
                paths,
                methods: Vec::new(),
                quota: None,
                quota_group: None,
                attributes: BTreeMap::new(),
            });
        }
        Ok(operations)
    }

    /// The base path for `api`: `--base-path`, else none (noted once per API when it is a proxy).
    fn base_path(&mut self, api: &str, is_proxy: bool) -> Option<String> {
        let found = self.settings.base_paths.get(api).cloned();
        if found.is_none() && is_proxy && self.noted_bases.insert(api.to_owned()) {
            self.report.note(
                format!("API {api}"),
                format!(
                    "no --base-path {api}=<proxy base path>: its resources are used as request paths, as Apigee's Envoy adapter matches them"
                ),
            );
        }
        found
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Whether an attribute belongs to monetization (Edge's `MINT_*`, X's monetization settings).
pub fn is_monetization(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("mint_") || lower.contains("monetization")
}

/// Custom attributes as a map; monetization ones are reported, the adapter's targets go to `targets`.
fn attributes(
    entity: &str,
    input: &[Attribute],
    report: &mut Report,
    mut targets: Option<&mut Option<String>>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for a in input {
        let name = a.name.trim();
        let value = a.value.text().unwrap_or_default().to_owned();
        if name.is_empty() {
            report.warn(entity, "an attribute without a name is not mapped");
            continue;
        }
        if name == TARGETS_ATTRIBUTE
            && let Some(slot) = targets.as_deref_mut()
        {
            *slot = Some(value);
            continue;
        }
        if is_monetization(name) {
            report.warn(
                entity,
                format!("attribute {name} (monetization) is not mapped"),
            );
            continue;
        }
        if out.insert(name.to_owned(), value).is_some() {
            report.warn(
                entity,
                format!("attribute {name} is listed twice: the last value is kept"),
            );
        }
    }
    out
}

/// A quota from Apigee's limit, interval and time unit; `None` (reported when not plain) when there is none.
fn limit(entity: &str, what: &str, q: &Quota, report: &mut Report) -> Option<Limit> {
    let text = q.limit.text()?;
    let Ok(n) = text.parse::<u64>() else {
        // golib logs the parse error and enforces no quota.
        report.warn(
            entity,
            format!("{what} limit {text:?} is not a whole number, so Apigee's Envoy adapter enforces none: no quota imported"),
        );
        return None;
    };
    if n == 0 {
        report.note(
            entity,
            format!("{what} limit 0 means no quota to Apigee's Envoy adapter: none imported"),
        );
        return None;
    }
    let interval = match q.interval.text() {
        None => 1,
        Some(t) => {
            match t.parse::<u32>() {
                Ok(i) if i > 0 => i,
                _ => {
                    report.warn(
                    entity,
                    format!("{what} interval {t:?} is not a whole number of at least 1: imported as 1"),
                );
                    1
                }
            }
        }
    };
    let unit = match q.time_unit.text().map(str::to_ascii_lowercase).as_deref() {
        Some("second") => "second",
        Some("minute") => "minute",
        Some("hour") => "hour",
        Some("day") => "day",
        Some("week") => "week",
        Some("month") => "month",
        Some(other) => {
            report.warn(
                entity,
                format!("{what} time unit {other:?} is not second, minute, hour, day, week or month: imported without this quota (add one by hand)"),
            );
            return None;
        }
        None => {
            report.warn(
                entity,
                format!("{what} has a limit but no time unit: imported without this quota (add one by hand)"),
            );
            return None;
        }
    };
    Some(Limit {
        limit: n,
        interval,
        unit,
    })
}

/// Methods upper-cased, sorted and without repeats (golib sorts them too); empty is every method.
fn methods(input: &[String]) -> Result<Vec<String>, String> {
    let mut out = BTreeSet::new();
    for m in input.iter().map(|m| m.trim()).filter(|m| !m.is_empty()) {
        if !m.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(format!("{m:?} is not an HTTP method"));
        }
        out.insert(m.to_ascii_uppercase());
    }
    Ok(out.into_iter().collect())
}

/// The catalog path patterns for an Apigee resource under an optional base path.
///
/// Apigee's `/` is the base path itself and everything below it, so under a base path it becomes the base
/// and `base/**`; without one it is `/`, which matches every path.
pub fn resource_paths(base: Option<&str>, resource: &str) -> Result<Vec<String>, String> {
    let resource = resource.trim();
    if resource.is_empty() {
        return Err("the resource is empty".into());
    }
    if !resource.starts_with('/') {
        // Apigee's path suffix always starts with '/': such a resource never matches a request.
        return Err("it does not start with '/', so it never matches a request".into());
    }
    let paths = match base {
        None | Some("") => vec![resource.to_owned()],
        Some(base) if resource == "/" => vec![base.to_owned(), format!("{base}/**")],
        Some(base) => vec![format!("{base}{resource}")],
    };
    for p in &paths {
        PathPattern::parse(p).map_err(|e| e.to_string())?;
    }
    Ok(paths)
}

/// A `--base-path` value: starts with '/', no trailing '/', no wildcard; `/` is no base at all.
pub fn normalize_base_path(text: &str) -> Result<String, String> {
    let trimmed = text.trim();
    if !trimmed.starts_with('/') {
        return Err(format!("base path {trimmed:?} must start with '/'"));
    }
    let base = trimmed.trim_end_matches('/');
    if base.is_empty() {
        return Ok(String::new());
    }
    if base.contains('*') {
        return Err(format!("base path {trimmed:?} cannot hold a wildcard"));
    }
    PathPattern::parse(base).map_err(|e| format!("base path {trimmed:?}: {e}"))?;
    Ok(base.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::apigee::model::{ApiProduct, Scalar};

    fn settings(bases: &[(&str, &str)]) -> Settings {
        Settings {
            base_paths: bases
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect(),
            ..Settings::default()
        }
    }

    fn run(json: &str, s: &Settings) -> (Products, Report) {
        let input: Vec<ApiProduct> = serde_json::from_str(json).unwrap();
        let mut report = Report::default();
        let out = convert(input, s, &mut report);
        (out, report)
    }

    #[test]
    fn resources_join_the_base_path_as_apigee_reads_them() {
        let b = Some("/v1/weather");
        assert_eq!(
            resource_paths(b, "/").unwrap(),
            vec!["/v1/weather", "/v1/weather/**"]
        );
        assert_eq!(resource_paths(b, "/**").unwrap(), vec!["/v1/weather/**"]);
        assert_eq!(
            resource_paths(b, "/forecast/*").unwrap(),
            vec!["/v1/weather/forecast/*"]
        );
        assert_eq!(resource_paths(None, "/").unwrap(), vec!["/"]);
        assert!(resource_paths(None, "forecast").is_err());
        // golib matches `*` inside a segment; catalog patterns cannot, so it is reported, never widened.
        assert!(
            resource_paths(None, "/fore*")
                .unwrap_err()
                .contains("mixes a wildcard")
        );
        assert!(resource_paths(None, "/a/**/b").is_err());
        assert_eq!(normalize_base_path("/v1/weather/").unwrap(), "/v1/weather");
        assert_eq!(normalize_base_path("/").unwrap(), "");
        assert!(normalize_base_path("v1").is_err());
        assert!(normalize_base_path("/v1/*").is_err());
    }

    #[test]
    fn quotas_follow_golib_strings_nulls_zero_and_units() {
        let mut r = Report::default();
        let q = |l: &str, i: &str, u: &str| Quota {
            limit: Scalar::of(l),
            interval: Scalar::of(i),
            time_unit: Scalar::of(u),
        };
        assert_eq!(
            limit("p", "product quota", &q("1000", "1", "Month"), &mut r),
            Some(Limit {
                limit: 1000,
                interval: 1,
                unit: "month"
            })
        );
        assert_eq!(limit("p", "product quota", &Quota::default(), &mut r), None);
        assert!(r.findings().is_empty());
        assert_eq!(
            limit("p", "product quota", &q("0", "1", "day"), &mut r),
            None
        );
        assert_eq!(
            limit("p", "product quota", &q("10", "1", "fortnight"), &mut r),
            None
        );
        assert_eq!(
            limit("p", "product quota", &q("ten", "1", "day"), &mut r),
            None
        );
        let lines = r.to_string();
        assert!(lines.contains("limit 0 means no quota"), "{lines}");
        assert!(
            lines.contains("\"fortnight\" is not second, minute"),
            "{lines}"
        );
        assert!(lines.contains("\"ten\" is not a whole number"), "{lines}");
    }

    #[test]
    fn an_operation_config_with_a_quota_shares_one_counter_across_its_operations() {
        let (out, report) = run(
            r#"[{"name": "p", "environments": ["prod"], "quota": "100", "quotaInterval": "1", "quotaTimeUnit": "day",
                 "operationGroup": {"operationConfigType": "proxy", "operationConfigs": [
                   {"apiSource": "weatherapi",
                    "operations": [{"resource": "/forecast", "methods": ["get"]},
                                   {"resource": "/alerts", "methods": ["GET"]},
                                   {"resource": "/reports", "methods": ["POST", "PUT"]}],
                    "quota": {"limit": "5", "interval": "1", "timeUnit": "minute"},
                    "attributes": [{"name": "tier", "value": "gold"}]},
                   {"apiSource": "geo", "operations": [{"resource": "/", "methods": []}]}]}}]"#,
            &settings(&[("weatherapi", "/v1/weather")]),
        );
        let p = &out.list[0];
        assert_eq!(p.quota.unwrap().limit, 100);
        let names: Vec<&str> = p.operations.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, vec!["weatherapi GET", "weatherapi POST,PUT", "geo"]);
        let get = &p.operations[0];
        assert_eq!(
            get.paths,
            vec!["/v1/weather/forecast", "/v1/weather/alerts"]
        );
        assert_eq!(get.quota.unwrap().limit, 5);
        assert_eq!(get.quota_group.as_deref(), Some("weatherapi"));
        assert_eq!(p.operations[1].quota_group.as_deref(), Some("weatherapi"));
        assert_eq!(get.attributes.get("tier").map(String::as_str), Some("gold"));
        // No quota of its own: charges the product quota (no operation quota, no group).
        let geo = &p.operations[2];
        assert_eq!((geo.quota, geo.quota_group.as_deref()), (None, None));
        assert!(geo.methods.is_empty());
        assert_eq!(geo.paths, vec!["/"]);
        let lines = report.to_string();
        assert!(
            lines.contains("note: API geo: no --base-path geo="),
            "{lines}"
        );
        assert!(!lines.contains("API weatherapi"), "{lines}");
    }

    #[test]
    fn a_single_operation_needs_no_group_and_repeated_api_sources_get_numbered() {
        let (out, report) = run(
            r#"[{"name": "p", "environments": ["prod"],
                 "operationGroup": {"operationConfigs": [
                   {"apiSource": "a", "operations": [{"resource": "/x"}], "quota": {"limit": 3, "interval": 1, "timeUnit": "hour"}},
                   {"apiSource": "a", "operations": [{"resource": "/y"}]}]}}]"#,
            &Settings::default(),
        );
        let ops = &out.list[0].operations;
        assert_eq!(ops[0].name, "a#1");
        assert_eq!(ops[0].quota_group, None);
        assert_eq!(ops[1].name, "a#2");
        assert!(
            report
                .to_string()
                .contains("2 operationConfigs share API a")
        );
    }

    #[test]
    fn legacy_products_cover_proxies_and_adapter_targets_with_every_resource() {
        let (out, report) = run(
            r#"[{"name": "legacy", "environments": ["test", "prod"], "approvalType": "manual",
                 "proxies": ["weatherapi", "remote-service"], "apiResources": ["/", "/forecastrss"],
                 "scopes": [""], "quota": "null", "quotaInterval": "null", "quotaTimeUnit": "null",
                 "attributes": [{"name": "access", "value": "public"},
                                {"name": "apigee-remote-service-targets", "value": "httpbin.org, geo.example.test"},
                                {"name": "MINT_TRANSACTION_SUCCESS_CRITERIA", "value": "x"}]}]"#,
            &settings(&[("weatherapi", "/weather")]),
        );
        let p = &out.list[0];
        assert_eq!(p.approval, "manual");
        assert!(p.scopes.is_empty() && p.quota.is_none());
        assert_eq!(p.environments, vec!["test", "prod"]);
        assert_eq!(
            p.attributes.iter().collect::<Vec<_>>(),
            vec![(&"access".to_owned(), &"public".to_owned())]
        );
        let ops: Vec<(&str, &Vec<String>)> = p
            .operations
            .iter()
            .map(|o| (o.api.as_str(), &o.paths))
            .collect();
        assert_eq!(ops[0].0, "weatherapi");
        assert_eq!(
            ops[0].1,
            &vec!["/weather", "/weather/**", "/weather/forecastrss"]
        );
        // Targets are Envoy's names for upstreams: no proxy, no base path.
        assert_eq!(
            ops[1],
            (
                "httpbin.org",
                &vec!["/".to_owned(), "/forecastrss".to_owned()]
            )
        );
        assert_eq!(ops[2].0, "geo.example.test");
        let lines = report.to_string();
        assert!(
            lines.contains("proxy remote-service is Apigee's Envoy adapter"),
            "{lines}"
        );
        assert!(
            lines.contains(
                "attribute MINT_TRANSACTION_SUCCESS_CRITERIA (monetization) is not mapped"
            ),
            "{lines}"
        );
        assert!(!lines.contains("API httpbin.org"), "{lines}");
    }

    #[test]
    fn products_apigee_grants_nowhere_are_left_out_and_said_why() {
        let (out, report) = run(
            r#"[{"name": "noenv", "proxies": ["a"]},
                {"name": "noproxy", "environments": ["prod"]},
                {"name": "elsewhere", "environments": ["test"], "proxies": ["a"]},
                {"name": "ok", "environments": ["prod", "test"], "proxies": ["a"], "ratePlans": [{"id": "r"}]},
                {"name": "ok", "environments": ["prod"], "proxies": ["b"]}]"#,
            &Settings {
                environment: Some("prod".into()),
                environment_map: [("prod".to_owned(), "production".to_owned())].into(),
                ..Settings::default()
            },
        );
        assert_eq!(out.list.len(), 1);
        assert_eq!(out.list[0].environments, vec!["production", "test"]);
        assert_eq!(
            out.skipped.keys().collect::<Vec<_>>(),
            vec!["elsewhere", "noenv", "noproxy"]
        );
        let lines = report.to_string();
        for want in [
            "warning: product noenv: it is bound to no environment",
            "warning: product noproxy: it lists no API proxies",
            "warning: product elsewhere: it is not bound to environment prod (--environment): not imported",
            "warning: product ok: ratePlans (rate plans) is not mapped",
            "warning: product ok: listed twice",
        ] {
            assert!(lines.contains(want), "missing {want:?} in\n{lines}");
        }
    }
}
