//! Reading a catalog file and validating it into a [`Catalog`]; every error names its file, line and column.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use super::keys::KeyTable;
use super::{
    App, Approval, Catalog, Developer, Key, Meter, MeterValue, Operation, Product, Status,
    StatusMatch, Subscription, SubscriptionStatus, TokenQuota,
};
use crate::credits::{Prepaid, RefillPolicy};
use crate::identity::api_key::KeyHash;
use crate::matching::path::PathPattern;
use crate::paywall::access::PriceRef;
use crate::quota::{Limit, Unit};
use crate::source::{PathSeg, Source, SourceError};

/// Reads and validates the catalog file at `path` (YAML or JSON).
pub fn load(path: &Path) -> Result<Catalog, SourceError> {
    parse(&Source::read(path)?)
}

/// Validates an already read catalog source.
pub fn parse(source: &Source) -> Result<Catalog, SourceError> {
    let raw: RawCatalog = source.parse()?;
    Builder { source }.build(raw)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    products: Vec<RawProduct>,
    #[serde(default)]
    developers: Vec<RawDeveloper>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProduct {
    name: String,
    display_name: Option<String>,
    #[serde(default)]
    environments: Vec<String>,
    #[serde(default)]
    approval: Approval,
    #[serde(default)]
    scopes: Vec<String>,
    quota: Option<OneOrMany<RawLimit>>,
    #[serde(default)]
    operations: Vec<RawOperation>,
    meter: Option<RawMeter>,
    #[serde(default)]
    stripe_prices: Vec<String>,
    prepaid: Option<RawPrepaid>,
    #[serde(default)]
    stripe_credit_prices: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrepaid {
    cost: Option<u64>,
    refill: Option<RawRefill>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRefill {
    amount: u64,
    every: Unit,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperationPrepaid {
    cost: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    limit: u64,
    #[serde(default = "one_u32")]
    interval: u32,
    unit: Unit,
    counts: Option<String>,
    reserve: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperation {
    name: Option<String>,
    api: String,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    quota: Option<OneOrMany<RawLimit>>,
    #[serde(default = "one_u64")]
    cost: u64,
    prepaid: Option<RawOperationPrepaid>,
    quota_group: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeter {
    event_name: String,
    #[serde(default = "calls")]
    value: String,
    #[serde(default = "two_xx")]
    success: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeveloper {
    email: String,
    company: Option<String>,
    stripe_customer: Option<String>,
    #[serde(default)]
    apps: Vec<RawApp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: String,
    #[serde(default)]
    status: Status,
    client_id: Option<String>,
    #[serde(default)]
    products: Vec<RawSubscription>,
    #[serde(default)]
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubscription {
    name: String,
    status: Option<SubscriptionStatus>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    hash: String,
    #[serde(default)]
    status: Status,
    expires_at: Option<DateTime<Utc>>,
}

/// Largest credit amount a catalog may name (a cost, a refill, a top-up per unit): the ledger keeps signed
/// 64-bit sums, and a typo of many digits is better refused here than at every call.
const MAX_CREDITS: u64 = 1_000_000_000_000;

fn one_u32() -> u32 {
    1
}
fn one_u64() -> u64 {
    1
}
fn calls() -> String {
    "calls".to_owned()
}
fn two_xx() -> Vec<String> {
    vec!["2xx".to_owned()]
}

/// A value written either as one item or as a list of items (`quota: {…}` or `quota: [{…}, {…}]`).
struct OneOrMany<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a quota mapping or a list of quota mappings")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|t| OneOrMany(vec![t]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Vec::<T>::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(OneOrMany)
            }
        }
        deserializer.deserialize_any(V(PhantomData))
    }
}

struct Builder<'s> {
    source: &'s Source,
}

impl Builder<'_> {
    fn err(&self, path: &[PathSeg<'_>], message: impl Into<String>) -> SourceError {
        self.source.error_at(path, message)
    }

    fn build(&self, raw: RawCatalog) -> Result<Catalog, SourceError> {
        let mut products = Vec::with_capacity(raw.products.len());
        let mut products_by_name = HashMap::new();
        for (i, p) in raw.products.into_iter().enumerate() {
            let at = [PathSeg::Key("products"), PathSeg::Index(i)];
            let product = self.product(&at, p)?;
            if products_by_name.insert(product.name.clone(), i).is_some() {
                return Err(self.err(
                    &[at[0], at[1], PathSeg::Key("name")],
                    format!("duplicate product name {:?}", product.name),
                ));
            }
            products.push(product);
        }
        let sold = (0..products.len())
            .filter(|&i| !products[i].stripe_prices.is_empty())
            .collect();
        let mut credit_prices: HashMap<String, u64> = HashMap::new();
        for (i, product) in products.iter().enumerate() {
            for (price, credits) in &product.credit_prices {
                if credit_prices
                    .insert(price.clone(), *credits)
                    .is_some_and(|c| c != *credits)
                {
                    return Err(self.err(
                        &[
                            PathSeg::Key("products"),
                            PathSeg::Index(i),
                            PathSeg::Key("stripe_credit_prices"),
                        ],
                        format!(
                            "price {price} adds a different number of credits in another product"
                        ),
                    ));
                }
            }
        }
        let mut catalog = Catalog {
            products: Arc::new(products),
            products_by_name: Arc::new(products_by_name),
            sold: Arc::new(sold),
            credit_prices: Arc::new(credit_prices),
            ..Catalog::default()
        };

        let mut app_names = HashSet::new();
        // Gathered flat and made a table once: inserting one by one would fold the table's delta many times.
        let mut keys = HashMap::new();
        for (d, dev) in raw.developers.into_iter().enumerate() {
            let at = [PathSeg::Key("developers"), PathSeg::Index(d)];
            let email = non_empty(self, &at, "email", dev.email)?;
            let developer = catalog.developers.len();
            if catalog.developers_by_email.contains_key(&email) {
                return Err(self.err(
                    &[at[0], at[1], PathSeg::Key("email")],
                    format!("duplicate developer email {email:?}"),
                ));
            }
            catalog.put_developer(
                developer,
                Arc::new(Developer {
                    email,
                    company: dev.company.filter(|c| !c.is_empty()),
                    stripe_customer: dev.stripe_customer.filter(|c| !c.is_empty()),
                }),
            );
            for (a, raw_app) in dev.apps.into_iter().enumerate() {
                let at = [at[0], at[1], PathSeg::Key("apps"), PathSeg::Index(a)];
                self.app(
                    &mut catalog,
                    &mut app_names,
                    &mut keys,
                    developer,
                    &at,
                    raw_app,
                )?;
            }
        }
        catalog.keys = KeyTable::from_keys(keys.into_values());
        Ok(catalog)
    }

    fn product(&self, at: &[PathSeg<'_>; 2], p: RawProduct) -> Result<Product, SourceError> {
        let name = non_empty(self, at, "name", p.name)?;
        let (quota, quota_tokens) = match p.quota {
            Some(q) => self.limits(&[at[0], at[1], PathSeg::Key("quota")], q)?,
            None => (Vec::new(), None),
        };
        if p.operations.is_empty() {
            return Err(self.err(
                &[at[0], at[1], PathSeg::Key("name")],
                format!("product {name:?} has no operations: it would cover no request"),
            ));
        }
        let mut operations = Vec::with_capacity(p.operations.len());
        let mut op_names = HashSet::new();
        for (o, op) in p.operations.into_iter().enumerate() {
            let at = [at[0], at[1], PathSeg::Key("operations"), PathSeg::Index(o)];
            let operation = self.operation(&at, op, &p.attributes)?;
            if !op_names.insert(operation.name.clone()) {
                return Err(self.err(
                    &at,
                    format!(
                        "duplicate operation {:?} in product {name:?}: give one of them a distinct `name`",
                        operation.name
                    ),
                ));
            }
            operations.push(operation);
        }
        self.quota_groups(at, &name, &operations)?;
        let meter = match p.meter {
            Some(m) => Some(self.meter(&[at[0], at[1], PathSeg::Key("meter")], m)?),
            None => None,
        };
        let mut stripe_prices = Vec::with_capacity(p.stripe_prices.len());
        for (i, text) in p.stripe_prices.iter().enumerate() {
            let here = [
                at[0],
                at[1],
                PathSeg::Key("stripe_prices"),
                PathSeg::Index(i),
            ];
            let price = PriceRef::parse(text).map_err(|e| self.err(&here, e))?;
            if stripe_prices.contains(&price) {
                return Err(self.err(&here, format!("{text:?} is listed twice")));
            }
            stripe_prices.push(price);
        }
        let prepaid = match p.prepaid {
            Some(raw) => Some(self.prepaid(&[at[0], at[1], PathSeg::Key("prepaid")], raw)?),
            None => None,
        };
        if prepaid.is_none()
            && let Some(o) = operations.iter().position(|op| op.prepaid_cost.is_some())
        {
            return Err(self.err(
                &[
                    at[0],
                    at[1],
                    PathSeg::Key("operations"),
                    PathSeg::Index(o),
                    PathSeg::Key("prepaid"),
                ],
                format!("product {name:?} is not prepaid: give it `prepaid: {{cost: …}}` first"),
            ));
        }
        let mut credit_prices = Vec::with_capacity(p.stripe_credit_prices.len());
        for (price, credits) in p.stripe_credit_prices {
            let here = [at[0], at[1], PathSeg::Key("stripe_credit_prices")];
            if !price.starts_with("price_") || price.len() > 255 {
                return Err(self.err(
                    &here,
                    format!("{price:?} is not a Stripe price id (price_…): top-ups are matched by the invoice line's price id"),
                ));
            }
            if credits == 0 || credits > MAX_CREDITS {
                return Err(self.err(
                    &here,
                    format!("price {price} must add 1 to {MAX_CREDITS} credits per unit"),
                ));
            }
            credit_prices.push((price, credits));
        }
        Ok(Product {
            name,
            display_name: p.display_name,
            environments: p.environments,
            approval: p.approval,
            scopes: p.scopes,
            quota,
            operations,
            meter,
            stripe_prices,
            prepaid,
            credit_prices,
            attributes: p.attributes,
            quota_tokens,
        })
    }

    /// Operations that share a `quota_group` share one counter, so they must agree on the quota it holds; a
    /// group named like another operation would share that operation's counter by accident.
    fn quota_groups(
        &self,
        at: &[PathSeg<'_>; 2],
        product: &str,
        operations: &[Operation],
    ) -> Result<(), SourceError> {
        for (o, op) in operations.iter().enumerate() {
            let Some(group) = &op.quota_group else {
                continue;
            };
            let here = [
                at[0],
                at[1],
                PathSeg::Key("operations"),
                PathSeg::Index(o),
                PathSeg::Key("quota_group"),
            ];
            let Some(quota) = &op.quota else {
                return Err(self.err(
                    &here,
                    format!(
                        "operation {:?} has a quota_group but no quota of its own",
                        op.name
                    ),
                ));
            };
            let first = operations
                .iter()
                .find(|other| other.quota_group.as_ref() == Some(group));
            if let Some(first) = first
                && (first.quota.as_ref() != Some(quota) || first.quota_tokens != op.quota_tokens)
            {
                return Err(self.err(
                    &here,
                    format!(
                        "operations {:?} and {:?} share quota_group {group:?} with different quotas: a group has one counter",
                        first.name, op.name
                    ),
                ));
            }
            if let Some(other) = operations
                .iter()
                .find(|other| other.name == *group && other.quota_group.as_ref() != Some(group))
            {
                return Err(self.err(
                    &here,
                    format!(
                        "quota_group {group:?} of product {product:?} is also the name of operation {:?} outside the group: rename one",
                        other.name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn prepaid(&self, at: &[PathSeg<'_>; 3], raw: RawPrepaid) -> Result<Prepaid, SourceError> {
        let cost = raw.cost.unwrap_or(1);
        if cost == 0 || cost > MAX_CREDITS {
            return Err(self.err(
                &[at[0], at[1], at[2], PathSeg::Key("cost")],
                format!(
                    "prepaid cost must be 1 to {MAX_CREDITS} (an operation may set 0 to be free)"
                ),
            ));
        }
        let refill = match raw.refill {
            Some(r) => {
                let here = [at[0], at[1], at[2], PathSeg::Key("refill")];
                if r.amount == 0 || r.amount > MAX_CREDITS {
                    return Err(
                        self.err(&here, format!("refill amount must be 1 to {MAX_CREDITS}"))
                    );
                }
                if matches!(r.every, Unit::Second | Unit::Minute) {
                    return Err(self.err(&here, "refill every must be hour, day, week or month"));
                }
                Some(RefillPolicy {
                    amount: r.amount,
                    every: r.every,
                })
            }
            None => None,
        };
        Ok(Prepaid { cost, refill })
    }

    fn limits(
        &self,
        at: &[PathSeg<'_>],
        raw: OneOrMany<RawLimit>,
    ) -> Result<(Vec<Limit>, Option<TokenQuota>), SourceError> {
        let many = raw.0.len() > 1;
        let mut limits = Vec::with_capacity(raw.0.len());
        let mut counted: Vec<(Option<String>, Option<u64>)> = Vec::with_capacity(raw.0.len());
        for (i, l) in raw.0.into_iter().enumerate() {
            let mut here = at.to_vec();
            if many {
                here.push(PathSeg::Index(i));
            }
            if l.limit == 0 {
                here.push(PathSeg::Key("limit"));
                return Err(self.err(&here, "quota limit must be at least 1"));
            }
            if l.interval == 0 {
                here.push(PathSeg::Key("interval"));
                return Err(self.err(&here, "quota interval must be at least 1"));
            }
            if limits
                .iter()
                .any(|seen: &Limit| seen.unit == l.unit && seen.interval == l.interval)
            {
                return Err(self.err(
                    &here,
                    format!(
                        "two limits per {} {}: keep one (the smaller limit is the one that applies)",
                        l.interval,
                        l.unit.as_str()
                    ),
                ));
            }
            if let Some(counts) = &l.counts
                && usage_key(counts).is_none()
            {
                here.push(PathSeg::Key("counts"));
                return Err(self.err(
                    &here,
                    format!("quota counts {counts:?} is not genai:input_tokens, genai:output_tokens, genai:total_tokens or response_json:/<pointer>"),
                ));
            }
            match (&l.counts, l.reserve) {
                (None, Some(_)) => {
                    here.push(PathSeg::Key("reserve"));
                    return Err(self.err(
                        &here,
                        "reserve needs counts: a call quota spends the operation's cost",
                    ));
                }
                (Some(_), None | Some(0)) => {
                    here.push(PathSeg::Key("reserve"));
                    return Err(self.err(
                        &here,
                        "a quota that counts a meter value needs reserve >= 1: what the Check holds until the response tells the real count",
                    ));
                }
                (Some(_), Some(reserve)) if reserve > l.limit => {
                    here.push(PathSeg::Key("reserve"));
                    return Err(self.err(
                        &here,
                        format!("reserve {reserve} is above the limit {}: no call would ever be admitted", l.limit),
                    ));
                }
                _ => {}
            }
            if let Some(first) = counted.first()
                && *first != (l.counts.clone(), l.reserve)
            {
                return Err(self.err(
                    &here,
                    "every limit of one quota counts the same thing with the same reserve: split calls and tokens over the product and its operations",
                ));
            }
            counted.push((l.counts, l.reserve));
            limits.push(Limit {
                limit: l.limit,
                interval: l.interval,
                unit: l.unit,
            });
        }
        if limits.is_empty() {
            return Err(self.err(at, "quota list is empty: remove `quota` for no limit"));
        }
        let tokens = match counted.into_iter().next() {
            Some((Some(counts), Some(reserve))) => Some(TokenQuota { counts, reserve }),
            _ => None,
        };
        Ok((limits, tokens))
    }

    fn operation(
        &self,
        at: &[PathSeg<'_>; 4],
        op: RawOperation,
        product_attributes: &BTreeMap<String, String>,
    ) -> Result<Operation, SourceError> {
        let api = non_empty(self, at, "api", op.api)?;
        if op.paths.is_empty() {
            return Err(self.err(
                at,
                "operation needs at least one path (\"/\" covers every path)",
            ));
        }
        let mut paths = Vec::with_capacity(op.paths.len());
        for (i, p) in op.paths.iter().enumerate() {
            let pattern = PathPattern::parse(p).map_err(|e| {
                self.err(
                    &[
                        at[0],
                        at[1],
                        at[2],
                        at[3],
                        PathSeg::Key("paths"),
                        PathSeg::Index(i),
                    ],
                    e.to_string(),
                )
            })?;
            paths.push(pattern);
        }
        let mut methods = Vec::with_capacity(op.methods.len());
        for (i, m) in op.methods.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(self.err(
                    &[
                        at[0],
                        at[1],
                        at[2],
                        at[3],
                        PathSeg::Key("methods"),
                        PathSeg::Index(i),
                    ],
                    format!("{m:?} is not an HTTP method"),
                ));
            }
            methods.push(m.to_ascii_uppercase());
        }
        let (quota, quota_tokens) = match op.quota {
            Some(q) => {
                let (limits, tokens) =
                    self.limits(&[at[0], at[1], at[2], at[3], PathSeg::Key("quota")], q)?;
                (Some(limits), tokens)
            }
            None => (None, None),
        };
        let name = match op.name {
            Some(n) if !n.is_empty() => n,
            Some(_) => {
                return Err(self.err(
                    &[at[0], at[1], at[2], at[3], PathSeg::Key("name")],
                    "operation name is empty",
                ));
            }
            None => default_operation_name(&api, &methods, &op.paths),
        };
        let quota_group = match op.quota_group {
            Some(g) if g.is_empty() => {
                return Err(self.err(
                    &[at[0], at[1], at[2], at[3], PathSeg::Key("quota_group")],
                    "quota_group is empty",
                ));
            }
            other => other,
        };
        let mut attributes = product_attributes.clone();
        attributes.extend(op.attributes);
        Ok(Operation {
            name,
            api,
            paths,
            methods,
            quota,
            quota_tokens,
            quota_group,
            attributes: Arc::new(attributes),
            cost: op.cost,
            prepaid_cost: match op.prepaid {
                Some(p) if p.cost > MAX_CREDITS => {
                    return Err(self.err(
                        &[at[0], at[1], at[2], at[3], PathSeg::Key("prepaid")],
                        format!("prepaid cost must be 0 to {MAX_CREDITS}"),
                    ));
                }
                Some(p) => Some(p.cost),
                None => None,
            },
        })
    }

    fn meter(&self, at: &[PathSeg<'_>; 3], m: RawMeter) -> Result<Meter, SourceError> {
        let event_name = non_empty(self, at, "event_name", m.event_name)?;
        let value = match m.value.as_str() {
            "calls" => MeterValue::Calls,
            "request_bytes" => MeterValue::RequestBytes,
            "response_bytes" => MeterValue::ResponseBytes,
            other => match (other.strip_prefix("response_header:"), usage_key(other)) {
                (Some(h), _) if is_header_name(h) => {
                    MeterValue::ResponseHeader(h.to_ascii_lowercase())
                }
                (_, Some(key)) => MeterValue::Usage(key),
                _ => {
                    return Err(self.err(
                        &[at[0], at[1], at[2], PathSeg::Key("value")],
                        format!(
                            "meter value {other:?} is not one of calls, request_bytes, response_bytes, response_header:<name>, genai:input_tokens, genai:output_tokens, genai:total_tokens, response_json:/<pointer>"
                        ),
                    ));
                }
            },
        };
        let mut success = Vec::with_capacity(m.success.len());
        for (i, s) in m.success.iter().enumerate() {
            let parsed = parse_status_match(s).ok_or_else(|| {
                self.err(
                    &[
                        at[0],
                        at[1],
                        at[2],
                        PathSeg::Key("success"),
                        PathSeg::Index(i),
                    ],
                    format!("{s:?} is not a status class (1xx..5xx) or a status code (100..599)"),
                )
            })?;
            success.push(parsed);
        }
        Ok(Meter {
            event_name,
            value,
            success,
        })
    }

    fn app(
        &self,
        catalog: &mut Catalog,
        app_names: &mut HashSet<String>,
        keys: &mut HashMap<KeyHash, Key>,
        developer: usize,
        at: &[PathSeg<'_>; 4],
        raw: RawApp,
    ) -> Result<(), SourceError> {
        let name = non_empty(self, at, "name", raw.name)?;
        if !app_names.insert(name.clone()) {
            return Err(self.err(
                &[at[0], at[1], at[2], at[3], PathSeg::Key("name")],
                format!("duplicate app name {name:?} (app names are unique across developers)"),
            ));
        }
        let app_id = catalog.apps.len();
        if let Some(client_id) = &raw.client_id
            && catalog.apps_by_client_id.contains_key(client_id)
        {
            return Err(self.err(
                &[at[0], at[1], at[2], at[3], PathSeg::Key("client_id")],
                format!("duplicate client_id {client_id:?}"),
            ));
        }
        let mut products = Vec::with_capacity(raw.products.len());
        let mut seen = HashSet::new();
        for (i, s) in raw.products.into_iter().enumerate() {
            let here = [
                at[0],
                at[1],
                at[2],
                at[3],
                PathSeg::Key("products"),
                PathSeg::Index(i),
                PathSeg::Key("name"),
            ];
            let Some(product) = catalog.product_id(&s.name) else {
                return Err(self.err(
                    &here,
                    format!("app {name:?} subscribes to unknown product {:?}", s.name),
                ));
            };
            if !seen.insert(product) {
                return Err(self.err(
                    &here,
                    format!("app {name:?} lists product {:?} twice", s.name),
                ));
            }
            let status = s
                .status
                .unwrap_or(match catalog.products[product].approval {
                    Approval::Auto => SubscriptionStatus::Approved,
                    Approval::Manual => SubscriptionStatus::Pending,
                });
            products.push(Subscription { product, status });
        }
        for (i, k) in raw.keys.into_iter().enumerate() {
            let here = [
                at[0],
                at[1],
                at[2],
                at[3],
                PathSeg::Key("keys"),
                PathSeg::Index(i),
                PathSeg::Key("hash"),
            ];
            let hash = KeyHash::parse(&k.hash).map_err(|e| self.err(&here, e.to_string()))?;
            let key = Key {
                hash,
                app: app_id,
                status: k.status,
                expires_at: k.expires_at.map(|t| t.timestamp()),
            };
            if keys.insert(hash, key).is_some() {
                return Err(self.err(
                    &here,
                    "duplicate key hash: each key belongs to exactly one app",
                ));
            }
        }
        catalog.put_app(
            app_id,
            Arc::new(App {
                name,
                developer,
                status: raw.status,
                client_id: raw.client_id,
                products,
            }),
        );
        Ok(())
    }
}

fn non_empty(
    b: &Builder<'_>,
    at: &[PathSeg<'_>],
    field: &'static str,
    value: String,
) -> Result<String, SourceError> {
    if value.trim().is_empty() {
        let mut here = at.to_vec();
        here.push(PathSeg::Key(field));
        return Err(b.err(&here, format!("{field} must not be empty")));
    }
    Ok(value)
}

fn default_operation_name(api: &str, methods: &[String], paths: &[String]) -> String {
    let mut name = api.to_owned();
    if !methods.is_empty() {
        name.push(' ');
        name.push_str(&methods.join(","));
    }
    name.push(' ');
    name.push_str(&paths.join(","));
    name
}

fn is_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A usage value the response body reports (CONTRACT §11), as meters and token quotas name it.
fn usage_key(text: &str) -> Option<String> {
    match text {
        "genai:input_tokens" | "genai:output_tokens" | "genai:total_tokens" => {
            Some(text.to_owned())
        }
        _ => text
            .strip_prefix("response_json:")
            .filter(|pointer| pointer.starts_with('/') && !pointer.chars().any(char::is_control))
            .map(|_| text.to_owned()),
    }
}

fn parse_status_match(s: &str) -> Option<StatusMatch> {
    let b = s.as_bytes();
    if b.len() != 3 || !(b'1'..=b'5').contains(&b[0]) {
        return None;
    }
    if b[1..].eq_ignore_ascii_case(b"xx") {
        return Some(StatusMatch::Class(u16::from(b[0] - b'0')));
    }
    s.parse::<u16>().ok().map(StatusMatch::Code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> Result<Catalog, SourceError> {
        parse(&Source::from_text("catalog.yaml", text.to_owned()))
    }

    fn error(text: &str) -> String {
        match parse_text(text) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    const GOOD: &str = "\
products:
  - name: weather_free
    environments: [test]
    approval: auto
    quota: {limit: 10, interval: 2, unit: hour}
    operations:
      - api: weatherapi
        paths: [/forecastrss]
        methods: [get]
    meter: {event_name: weather_api_calls, value: calls, success: [2xx, 3xx]}
  - name: weather_gold
    approval: manual
    quota: [{limit: 500, unit: month}, {limit: 2, unit: second}]
    operations:
      - api: weatherapi
        paths: [/**]
        quota: {limit: 1000, unit: day}
        cost: 2
    meter: {event_name: tokens, value: 'response_header:x-tokens'}
developers:
  - email: ntesla@theremin.com
    company: theremin
    stripe_customer: cus_Ntesla0001
    apps:
      - name: weatherapp
        client_id: weatherapp
        products:
          - {name: weather_free, status: approved}
          - {name: weather_gold}
        keys:
          - hash: sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
            expires_at: 2027-01-01T00:00:00Z
";

    #[test]
    fn attributes_and_quota_groups() {
        let c = parse_text(
            "products:\n  - name: p\n    attributes: {deprecated: 'false', tier: gold, version: 2}\n    operations:\n      - {name: read, api: a, paths: [/pets], methods: [GET], quota: {limit: 5, unit: day}, quota_group: pets}\n      - {name: write, api: a, paths: [/pets], methods: [POST], quota: {limit: 5, unit: day}, quota_group: pets, attributes: {deprecated: 'true'}}\n      - {name: other, api: a, paths: [/other]}\n",
        )
        .unwrap();
        let ops = &c.products()[0].operations;
        assert_eq!(ops[0].counter(), "pets");
        assert_eq!(ops[1].counter(), "pets");
        assert_eq!(ops[2].counter(), "other");
        assert_eq!(
            ops[0].attributes.get("deprecated").map(String::as_str),
            Some("false")
        );
        assert_eq!(
            ops[1].attributes.get("deprecated").map(String::as_str),
            Some("true")
        );
        assert_eq!(
            ops[1].attributes.get("tier").map(String::as_str),
            Some("gold")
        );
        assert_eq!(
            ops[2].attributes.get("version").map(String::as_str),
            Some("2")
        );

        let product = "products:\n  - name: p\n    operations:\n";
        for (ops, expected) in [
            (
                "      - {name: r, api: a, paths: [/], quota: {limit: 5, unit: day}, quota_group: g}\n      - {name: w, api: a, paths: [/w], quota: {limit: 6, unit: day}, quota_group: g}\n",
                "catalog.yaml:5:83: operations \"r\" and \"w\" share quota_group \"g\" with different quotas",
            ),
            (
                "      - {name: r, api: a, paths: [/], quota_group: g}\n",
                "catalog.yaml:4:52: operation \"r\" has a quota_group but no quota of its own",
            ),
            (
                "      - {name: g, api: a, paths: [/], quota: {limit: 5, unit: day}}\n      - {name: w, api: a, paths: [/w], quota: {limit: 5, unit: day}, quota_group: g}\n",
                "quota_group \"g\" of product \"p\" is also the name of operation \"g\" outside the group",
            ),
            (
                "      - {name: r, api: a, paths: [/], quota: {limit: 5, unit: day}, quota_group: ''}\n",
                "quota_group is empty",
            ),
        ] {
            let e = error(&format!("{product}{ops}"));
            assert!(e.contains(expected), "{e}");
        }
    }

    #[test]
    fn a_full_catalog_loads() {
        let c = parse_text(GOOD).unwrap();
        assert_eq!(c.products().len(), 2);
        let free = &c.products()[0];
        assert_eq!(
            free.quota,
            vec![Limit {
                limit: 10,
                interval: 2,
                unit: Unit::Hour
            }]
        );
        assert_eq!(free.operations[0].methods, vec!["GET"]);
        assert_eq!(free.operations[0].name, "weatherapi GET /forecastrss");
        assert_eq!(
            free.meter.as_ref().unwrap().success,
            vec![StatusMatch::Class(2), StatusMatch::Class(3)]
        );
        let gold = &c.products()[1];
        assert_eq!(gold.quota.len(), 2);
        assert_eq!(gold.operations[0].cost, 2);
        assert_eq!(
            gold.meter.as_ref().unwrap().value,
            MeterValue::ResponseHeader("x-tokens".into())
        );
        let app = c.app(0).unwrap();
        assert_eq!(app.products[0].status, SubscriptionStatus::Approved);
        // Manual approval without an explicit status is pending.
        assert_eq!(app.products[1].status, SubscriptionStatus::Pending);
        let key = c.key(&KeyHash::of("abc")).unwrap();
        assert_eq!(key.app, 0);
        assert_eq!(key.expires_at, Some(1_798_761_600));
        assert!(c.key(&KeyHash::of("abd")).is_none());
        assert_eq!(c.app_by_client_id("weatherapp"), Some(0));
    }

    #[test]
    fn json_catalogs_load_too() {
        let c = parse_text(
            r#"{"products": [{"name": "p", "operations": [{"api": "a", "paths": ["/"]}]}],
                "developers": [{"email": "d@x", "apps": [{"name": "app", "products": [{"name": "p"}]}]}]}"#,
        )
        .unwrap();
        assert_eq!(c.app(0).unwrap().products.len(), 1);
    }

    #[test]
    fn errors_name_the_file_line_and_column() {
        let cases: &[(&str, &str)] = &[
            (
                "products:\n  - name: p\n    operations: [{api: a, paths: [/]}]\ndevelopers:\n  - email: d@x\n    apps:\n      - name: app\n        products: [{name: nope}]\n",
                "catalog.yaml:8:27: app \"app\" subscribes to unknown product \"nope\"",
            ),
            (
                "products:\n  - name: p\n    operations:\n      - api: a\n        paths: [/fore*]\n",
                "catalog.yaml:5:17: ",
            ),
            (
                "products:\n  - name: p\n    quota: {limit: 0, unit: day}\n    operations: [{api: a, paths: [/]}]\n",
                "catalog.yaml:3:20: quota limit must be at least 1",
            ),
            (
                "products:\n  - name: p\n    quota: [{limit: 5, unit: day}, {limit: 9, unit: day}]\n    operations: [{api: a, paths: [/]}]\n",
                "catalog.yaml:3:36: two limits per 1 day",
            ),
            (
                "products:\n  - name: p\n    quota: {limit: 5, unit: fortnight}\n    operations: [{api: a, paths: [/]}]\n",
                "catalog.yaml:3:",
            ),
            (
                "products:\n  - name: p\n    operations: [{api: a, paths: [/]}]\n  - name: p\n    operations: [{api: a, paths: [/]}]\n",
                "catalog.yaml:4:11: duplicate product name \"p\"",
            ),
            (
                "products:\n  - name: p\n    colour: red\n    operations: [{api: a, paths: [/]}]\n",
                "catalog.yaml:3:5: products[0]: unknown field `colour`",
            ),
        ];
        for (text, want) in cases {
            let got = error(text);
            assert!(got.starts_with(want), "got {got:?}, want prefix {want:?}");
        }
    }

    #[test]
    fn duplicate_keys_and_bad_hashes_are_refused() {
        let dup = "\
products: [{name: p, operations: [{api: a, paths: [/]}]}]
developers:
  - email: d@x
    apps:
      - name: one
        keys: [{hash: 'sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'}]
      - name: two
        keys: [{hash: 'sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'}]
";
        assert!(
            error(dup).starts_with("catalog.yaml:8:23: duplicate key hash"),
            "{}",
            error(dup)
        );
        let bad = "developers: [{email: d@x, apps: [{name: a, keys: [{hash: 'md5:00'}]}]}]\n";
        assert!(
            error(bad).contains("key hash must start with"),
            "{}",
            error(bad)
        );
    }

    #[test]
    fn status_matches_parse() {
        assert_eq!(parse_status_match("2xx"), Some(StatusMatch::Class(2)));
        assert_eq!(parse_status_match("4XX"), Some(StatusMatch::Class(4)));
        assert_eq!(parse_status_match("201"), Some(StatusMatch::Code(201)));
        for bad in ["6xx", "2x", "abc", "20", "2000", ""] {
            assert_eq!(parse_status_match(bad), None, "{bad}");
        }
    }

    #[test]
    fn prepaid_products_parse_and_their_mistakes_are_positioned() {
        let good = "\
products:
  - name: credits
    prepaid: {cost: 2, refill: {amount: 1000, every: month}}
    stripe_credit_prices: {price_topup_1k: 1000}
    operations:
      - {api: geo, name: bulk, paths: [/bulk/**], prepaid: {cost: 0}}
      - {api: geo, paths: [/**]}
";
        let catalog = parse_text(good).expect("valid");
        let p = &catalog.products()[0];
        assert_eq!(
            p.prepaid,
            Some(Prepaid {
                cost: 2,
                refill: Some(RefillPolicy {
                    amount: 1000,
                    every: Unit::Month
                })
            })
        );
        assert_eq!(p.operations[0].prepaid_cost, Some(0));
        assert_eq!(p.operations[1].prepaid_cost, None);
        assert_eq!(catalog.credit_price("price_topup_1k"), Some(1000));
        assert_eq!(catalog.credit_price("price_other"), None);

        let cases = [
            (
                "products: [{name: p, prepaid: {cost: 0}, operations: [{api: a, paths: [/]}]}]\n",
                "catalog.yaml:1:38: prepaid cost must be 1 to 1000000000000",
            ),
            (
                "products: [{name: p, operations: [{api: a, paths: [/], prepaid: {cost: 3}}]}]\n",
                "is not prepaid",
            ),
            (
                "products: [{name: p, prepaid: {refill: {amount: 99999999999999, every: day}}, operations: [{api: a, paths: [/]}]}]\n",
                "refill amount must be 1 to 1000000000000",
            ),
            (
                "products: [{name: p, prepaid: {refill: {amount: 5, every: minute}}, operations: [{api: a, paths: [/]}]}]\n",
                "refill every must be hour, day, week or month",
            ),
            (
                "products: [{name: p, stripe_credit_prices: {lookup_key:x: 5}, operations: [{api: a, paths: [/]}]}]\n",
                "is not a Stripe price id",
            ),
            (
                "products:\n  - {name: p, stripe_credit_prices: {price_a: 5}, operations: [{api: a, paths: [/]}]}\n  - {name: q, stripe_credit_prices: {price_a: 6}, operations: [{api: a, paths: [/]}]}\n",
                "price price_a adds a different number of credits in another product",
            ),
        ];
        for (text, wanted) in cases {
            let e = error(text);
            assert!(e.contains(wanted), "{e}");
        }
    }
}
