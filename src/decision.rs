//! The decision for one request, as a pure function of the request, the catalog snapshot and the quota answer.
//!
//! `Check -> identify -> entitle -> match -> quota -> decide`: [`plan`] does everything up to the quota and
//! either decides outright or returns a [`Pending`] charge; the caller asks the quota store and hands its
//! answer to [`Pending::finish`]. Neither step does I/O, so the whole decision table is unit-tested here.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;

use crate::catalog::{App, Catalog, Status, Subscription, SubscriptionStatus};
use crate::identity::api_key::KeyHash;
use crate::identity::jwt::{JwtRejection, VerifiedToken};
use crate::identity::{ApiKeyConfig, Caller};
use crate::matching::{self, Match, Target, path};
use crate::quota::{Charge, Limit, LimitState, Outcome};

/// A request as Envoy describes it, with no protobuf in sight. No `Debug`: its headers carry credentials.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// HTTP method, uppercase.
    pub method: &'a str,
    /// `:path`, including the query string.
    pub path: &'a str,
    /// `:authority` (host, maybe with a port).
    pub authority: &'a str,
    /// Request headers, lowercase names.
    pub headers: &'a HashMap<String, String>,
    /// The route's ext_authz context extensions.
    pub context_extensions: &'a HashMap<String, String>,
}

/// What happens when the quota store cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Fail closed: 503.
    #[default]
    Deny,
    /// Fail open: the request goes through uncounted by the store.
    Allow,
}

/// The parts of the config that decisions depend on.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// The environment this sidecar serves (`environment`).
    pub environment: Option<String>,
    /// The context extension carrying the API id (`api_context_extension`).
    pub api_context_extension: Option<String>,
    /// `upstream_identity_headers`: name the caller to the upstream in `x-tollgate-*` headers.
    pub upstream_identity_headers: bool,
    /// Where API keys are looked for.
    pub api_key: ApiKeyConfig,
    /// `quota.on_store_error`.
    pub on_store_error: OnStoreError,
    /// `quota.on_store_error_by_api`: overrides by API id.
    pub on_store_error_by_api: HashMap<String, OnStoreError>,
    /// Whether bearer tokens are accepted (JWT providers are configured).
    pub bearer: bool,
}

impl Settings {
    /// What a quota store failure means for a request to `api`.
    pub fn on_store_error_for(&self, api: &str) -> OnStoreError {
        self.on_store_error_by_api
            .get(api)
            .copied()
            .unwrap_or(self.on_store_error)
    }
}

/// Why a request was allowed or denied: the `reason` in metadata and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Allowed and counted.
    Allowed,
    /// Allowed because the quota store failed and `on_store_error` is `allow`.
    AllowedStoreError,
    /// No credential.
    MissingCredential,
    /// A key the catalog does not know.
    UnknownKey,
    /// A revoked key.
    RevokedKey,
    /// An expired key.
    ExpiredKey,
    /// A bearer token that failed verification.
    InvalidToken,
    /// A valid token naming an app the catalog does not know.
    UnknownApp,
    /// A token's issuer keys could not be loaded yet.
    KeysUnavailable,
    /// The app is revoked.
    AppRevoked,
    /// The product that would cover the request is pending approval for the app.
    ProductPending,
    /// The app's subscription to the product that would cover the request is revoked.
    ProductRevoked,
    /// The product that would cover the request is not offered in this environment.
    ProductNotOffered,
    /// The token lacks every scope of the product that would cover the request.
    MissingScope,
    /// No product of the app covers the request.
    NoProduct,
    /// The path is dangerous.
    BadPath,
    /// The quota is spent.
    QuotaExceeded,
    /// The quota store failed and `on_store_error` is `deny`.
    StoreUnavailable,
}

impl Reason {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [Reason; 18] = [
        Reason::Allowed,
        Reason::AllowedStoreError,
        Reason::MissingCredential,
        Reason::UnknownKey,
        Reason::RevokedKey,
        Reason::ExpiredKey,
        Reason::InvalidToken,
        Reason::UnknownApp,
        Reason::KeysUnavailable,
        Reason::AppRevoked,
        Reason::ProductPending,
        Reason::ProductRevoked,
        Reason::ProductNotOffered,
        Reason::MissingScope,
        Reason::NoProduct,
        Reason::BadPath,
        Reason::QuotaExceeded,
        Reason::StoreUnavailable,
    ];

    /// The snake_case name used in metadata and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::AllowedStoreError => "allowed_store_error",
            Reason::MissingCredential => "missing_credential",
            Reason::UnknownKey => "unknown_key",
            Reason::RevokedKey => "revoked_key",
            Reason::ExpiredKey => "expired_key",
            Reason::InvalidToken => "invalid_token",
            Reason::UnknownApp => "unknown_app",
            Reason::KeysUnavailable => "keys_unavailable",
            Reason::AppRevoked => "app_revoked",
            Reason::ProductPending => "product_pending",
            Reason::ProductRevoked => "product_revoked",
            Reason::ProductNotOffered => "product_not_offered",
            Reason::MissingScope => "missing_scope",
            Reason::NoProduct => "no_product",
            Reason::BadPath => "bad_path",
            Reason::QuotaExceeded => "quota_exceeded",
            Reason::StoreUnavailable => "store_unavailable",
        }
    }

    /// Whether the request goes through.
    pub fn allows(self) -> bool {
        matches!(self, Reason::Allowed | Reason::AllowedStoreError)
    }

    /// The HTTP status of a denial (200 for an allow).
    pub fn http_status(self) -> u16 {
        match self {
            Reason::Allowed | Reason::AllowedStoreError => 200,
            Reason::BadPath => 400,
            Reason::MissingCredential
            | Reason::UnknownKey
            | Reason::RevokedKey
            | Reason::ExpiredKey
            | Reason::InvalidToken
            | Reason::UnknownApp => 401,
            Reason::AppRevoked
            | Reason::ProductPending
            | Reason::ProductRevoked
            | Reason::ProductNotOffered
            | Reason::MissingScope
            | Reason::NoProduct => 403,
            Reason::QuotaExceeded => 429,
            Reason::StoreUnavailable | Reason::KeysUnavailable => 503,
        }
    }

    /// The `error` field of a denial's JSON body (CONTRACT §4).
    pub fn error_code(self) -> &'static str {
        match self.http_status() {
            400 => "bad_request",
            401 => "unauthenticated",
            403 => "forbidden",
            429 => "quota_exceeded",
            503 => "unavailable",
            _ => "ok",
        }
    }
}

/// Who the caller is, as far as the decision got (metadata for Envoy and the access log).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity<'a> {
    /// App name.
    pub app: Option<&'a str>,
    /// Developer e-mail.
    pub developer: Option<&'a str>,
    /// Company.
    pub company: Option<&'a str>,
    /// Stripe customer.
    pub stripe_customer: Option<&'a str>,
    /// The product that covered the request.
    pub product: Option<&'a str>,
    /// The operation that covered the request.
    pub operation: Option<&'a str>,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'a> {
    /// Why; also says whether the request is allowed.
    pub reason: Reason,
    /// For denials, what to fix (never a secret).
    pub message: String,
    /// The caller, as far as known.
    pub identity: Identity<'a>,
    /// The API id the request was matched against.
    pub api: &'a str,
    /// The environment this sidecar serves.
    pub environment: Option<&'a str>,
    /// The quota state for `ratelimit-*` headers.
    pub ratelimit: Option<LimitState>,
    /// For a 429: seconds until the exhausted limit's window ends (`retry-after`).
    pub retry_after: Option<u64>,
}

impl Decision<'_> {
    /// Whether the request goes through.
    pub fn allowed(&self) -> bool {
        self.reason.allows()
    }
}

/// A decision that waits for the quota store.
#[derive(Debug)]
pub struct Pending<'a> {
    decision: Decision<'a>,
    bucket: String,
    limits: &'a [Limit],
    cost: u64,
    product: &'a str,
    now: i64,
}

/// The first half of a decision.
#[derive(Debug)]
pub enum Plan<'a> {
    /// Decided without the quota store.
    Decided(Decision<'a>),
    /// Allowed if the quota store agrees.
    Charge(Pending<'a>),
}

/// The quota store's bucket of `owner`'s counters for a product, or for one of its operations that has a
/// quota of its own.
fn bucket_key(owner: Owner<'_>, product: &str, operation: Option<&str>) -> String {
    match operation {
        Some(operation) => format!("{}\u{1f}{product}\u{1f}{operation}", owner.bucket()),
        None => format!("{}\u{1f}{product}", owner.bucket()),
    }
}

/// One quota counter an app spends: a product's quota, or an operation's own.
#[derive(Debug, Clone)]
pub struct AppQuota<'a> {
    /// The product.
    pub product: &'a str,
    /// The operation, when the counter is its own quota.
    pub operation: Option<&'a str>,
    /// The quota store's bucket.
    pub bucket: String,
    /// The limits charged on it.
    pub limits: &'a [Limit],
}

/// Every quota counter `app` spends, product by product in catalog order: for each approved subscription, the
/// product's quota (when some operation falls back to it) and each operation's own quota.
pub fn app_quotas<'a>(catalog: &'a Catalog, app: &'a App) -> Vec<AppQuota<'a>> {
    let owner = Owner::App(&app.name);
    let mut quotas = Vec::new();
    for subscription in &app.products {
        if subscription.status != SubscriptionStatus::Approved {
            continue;
        }
        let Some(product) = catalog.product(subscription.product) else {
            continue;
        };
        if !product.quota.is_empty() && product.operations.iter().any(|o| o.quota.is_none()) {
            quotas.push(AppQuota {
                product: &product.name,
                operation: None,
                bucket: bucket_key(owner, &product.name, None),
                limits: &product.quota,
            });
        }
        for operation in &product.operations {
            if let Some(limits) = operation.quota.as_deref().filter(|l| !l.is_empty()) {
                quotas.push(AppQuota {
                    product: &product.name,
                    operation: Some(&operation.name),
                    bucket: bucket_key(owner, &product.name, Some(&operation.name)),
                    limits,
                });
            }
        }
    }
    quotas
}

/// Who a request's credential resolved to in the catalog, and what it may use.
struct Entitled<'a> {
    identity: Identity<'a>,
    /// Names the caller in messages and starts its quota buckets.
    owner: Owner<'a>,
    subscriptions: Cow<'a, [Subscription]>,
    /// Scopes of a token caller; `None` for API keys, which products do not scope-check.
    scopes: Option<&'a [String]>,
}

/// Whose quota a call spends.
#[derive(Clone, Copy)]
enum Owner<'a> {
    /// A catalog app.
    App(&'a str),
    /// A portal token's company or developer, with no catalog app.
    Account(&'a str),
}

impl Owner<'_> {
    fn label(&self) -> String {
        match self {
            Owner::App(name) => format!("app {name}"),
            Owner::Account(name) => format!("account {name}"),
        }
    }

    /// The bucket prefix. Accounts start with a record separator, which no app name written in YAML carries,
    /// so an account can never share an app's counters.
    fn bucket(&self) -> String {
        match self {
            Owner::App(name) => (*name).to_owned(),
            Owner::Account(name) => format!("\u{1e}{name}"),
        }
    }
}

/// Identifies, entitles and matches a request; decides, or says what to charge.
pub fn plan<'a>(
    request: &Request<'a>,
    caller: &'a Caller<'a>,
    catalog: &'a Catalog,
    settings: &'a Settings,
    now: i64,
) -> Plan<'a> {
    let api = api_of(request, settings);
    let mut decision = Decision {
        reason: Reason::Allowed,
        message: String::new(),
        identity: Identity::default(),
        api,
        environment: settings.environment.as_deref(),
        ratelimit: None,
        retry_after: None,
    };
    let deny = |mut d: Decision<'a>, reason: Reason, message: String| {
        d.reason = reason;
        d.message = message;
        Plan::Decided(d)
    };

    let safe_path = match path::sanitize(request.path) {
        Ok(p) => p,
        Err(why) => {
            return deny(
                decision,
                Reason::BadPath,
                format!("request path refused: {why}"),
            );
        }
    };

    let entitled = match entitle(caller, catalog, settings, now, &mut decision.identity) {
        Ok(entitled) => entitled,
        Err((reason, message)) => return deny(decision, reason, message),
    };
    decision.identity = entitled.identity;

    let target = Target {
        api,
        method: request.method,
        path: &safe_path,
    };
    let env = settings.environment.as_deref();
    let products = catalog.products();
    let owner = entitled.owner;
    let found = matching::select(
        products,
        &entitled.subscriptions,
        entitled.scopes,
        env,
        &target,
    );
    let (product, operation) = match found {
        Match::Covered { product, operation } => match products
            .get(product)
            .and_then(|p| Some((p, p.operations.get(operation)?)))
        {
            Some(found) => found,
            None => {
                return deny(
                    decision,
                    Reason::NoProduct,
                    no_product_message(owner, &target),
                );
            }
        },
        Match::NotApproved { product, status } => {
            let name = products.get(product).map_or("", |p| p.name.as_str());
            let (reason, state) = match status {
                SubscriptionStatus::Revoked => (Reason::ProductRevoked, "revoked"),
                _ => (Reason::ProductPending, "pending approval"),
            };
            let message = format!(
                "{}'s subscription to product {name} is {state}",
                owner.label()
            );
            return deny(decision, reason, message);
        }
        Match::MissingScope { product } => {
            let (name, scopes) = products.get(product).map_or(("", String::new()), |p| {
                (p.name.as_str(), p.scopes.join(", "))
            });
            let message =
                format!("token has no scope that product {name} requires (one of: {scopes})");
            return deny(decision, Reason::MissingScope, message);
        }
        Match::NotOffered { product } => {
            let name = products.get(product).map_or("", |p| p.name.as_str());
            let message = match env {
                Some(env) => format!("product {name} is not offered in environment {env}"),
                None => format!(
                    "product {name} is limited to named environments and this gateway names none"
                ),
            };
            return deny(decision, Reason::ProductNotOffered, message);
        }
        Match::Uncovered => {
            return deny(
                decision,
                Reason::NoProduct,
                no_product_message(owner, &target),
            );
        }
    };
    decision.identity.product = Some(&product.name);
    decision.identity.operation = Some(&operation.name);

    let (limits, bucket) = match &operation.quota {
        Some(limits) => (
            limits.as_slice(),
            bucket_key(owner, &product.name, Some(&operation.name)),
        ),
        None => (
            product.quota.as_slice(),
            bucket_key(owner, &product.name, None),
        ),
    };
    if limits.is_empty() {
        return Plan::Decided(decision);
    }
    Plan::Charge(Pending {
        decision,
        bucket,
        limits,
        cost: operation.cost,
        product: &product.name,
        now,
    })
}

/// Resolves the caller to its identity and subscriptions, or says why it is refused. `known` receives the
/// identity as far as it is known before a refusal, for metadata.
fn entitle<'a>(
    caller: &'a Caller<'a>,
    catalog: &'a Catalog,
    settings: &Settings,
    now: i64,
    known: &mut Identity<'a>,
) -> Result<Entitled<'a>, (Reason, String)> {
    let app_identity = |app: &'a App| {
        let developer = catalog.developer(app.developer);
        Identity {
            app: Some(&app.name),
            developer: developer.map(|d| d.email.as_str()),
            company: developer.and_then(|d| d.company.as_deref()),
            stripe_customer: developer.and_then(|d| d.stripe_customer.as_deref()),
            product: None,
            operation: None,
        }
    };
    let (app, scopes) = match caller {
        Caller::Nothing => {
            return Err((
                Reason::MissingCredential,
                missing_credential_message(settings),
            ));
        }
        Caller::ApiKey { key, .. } => {
            let not_valid = || (Reason::UnknownKey, "API key is not valid".to_owned());
            let key = catalog.key(&KeyHash::of(key)).ok_or_else(not_valid)?;
            let app = catalog.app(key.app).ok_or_else(not_valid)?;
            *known = app_identity(app);
            if key.status == Status::Revoked {
                return Err((Reason::RevokedKey, "API key is revoked".into()));
            }
            if key.expires_at.is_some_and(|t| t <= now) {
                return Err((Reason::ExpiredKey, "API key has expired".into()));
            }
            (app, None)
        }
        Caller::Token(Err(rejection)) => {
            let reason = match rejection {
                JwtRejection::KeysUnavailable => Reason::KeysUnavailable,
                _ => Reason::InvalidToken,
            };
            return Err((reason, rejection.to_string()));
        }
        Caller::Token(Ok(token)) => {
            let registered = token
                .app
                .as_deref()
                .and_then(|client_id| catalog.app_by_client_id(client_id))
                .and_then(|id| catalog.app(id));
            match (registered, token.app.is_some()) {
                (Some(app), _) => {
                    *known = app_identity(app);
                    (app, Some(token.scopes.as_slice()))
                }
                // A token naming an app the catalog does not know is refused, unless its products claim
                // entitles it as a portal token.
                (None, true) if token.products.is_empty() => {
                    return Err((
                        Reason::UnknownApp,
                        "token's app is not registered".to_owned(),
                    ));
                }
                (None, _) => return account(token, catalog, known),
            }
        }
    };
    if app.status == Status::Revoked {
        return Err((Reason::AppRevoked, format!("app {} is revoked", app.name)));
    }
    Ok(Entitled {
        identity: known.clone(),
        owner: Owner::App(&app.name),
        subscriptions: Cow::Borrowed(&app.products),
        scopes,
    })
}

/// A portal token with no catalog app: its `products` claim entitles it, and its company (else developer) owns
/// the quota and the usage. The Stripe customer comes from the token, else from the catalog developer whose
/// e-mail is the token's developer.
fn account<'a>(
    token: &'a VerifiedToken,
    catalog: &'a Catalog,
    known: &mut Identity<'a>,
) -> Result<Entitled<'a>, (Reason, String)> {
    let developer = token.developer.as_deref();
    let listed = developer.and_then(|d| catalog.developer_by_email(d));
    *known = Identity {
        app: None,
        developer,
        company: token
            .company
            .as_deref()
            .or(listed.and_then(|d| d.company.as_deref())),
        stripe_customer: token
            .stripe_customer
            .as_deref()
            .or(listed.and_then(|d| d.stripe_customer.as_deref())),
        product: None,
        operation: None,
    };
    let Some(owner) = known.company.or(developer) else {
        return Err((
            Reason::InvalidToken,
            "token names no app, developer or company".into(),
        ));
    };
    if token.products.is_empty() {
        return Err((Reason::NoProduct, "token grants no products".into()));
    }
    let subscriptions = token
        .products
        .iter()
        .filter_map(|name| catalog.product_id(name))
        .map(|product| Subscription {
            product,
            status: SubscriptionStatus::Approved,
        })
        .collect();
    Ok(Entitled {
        identity: known.clone(),
        owner: Owner::Account(owner),
        subscriptions: Cow::Owned(subscriptions),
        scopes: Some(&token.scopes),
    })
}

impl<'a> Pending<'a> {
    /// What to ask the quota store.
    pub fn charge(&self, now: i64) -> Charge<'_> {
        Charge {
            bucket: &self.bucket,
            limits: self.limits,
            cost: self.cost,
            now,
        }
    }

    /// What a store failure means for this request: `quota.on_store_error`, or the override for its API.
    pub fn on_store_error(&self, settings: &Settings) -> OnStoreError {
        settings.on_store_error_for(self.decision.api)
    }

    /// Completes the decision with the quota answer.
    pub fn finish(self, answer: QuotaAnswer) -> Decision<'a> {
        let mut decision = self.decision;
        let (outcome, fallback) = match answer {
            QuotaAnswer::Store(outcome) => (outcome, false),
            QuotaAnswer::Fallback(outcome) => (outcome, true),
            QuotaAnswer::Unavailable => {
                decision.reason = Reason::StoreUnavailable;
                decision.message = "quota service is unavailable, try again shortly".into();
                return decision;
            }
        };
        match outcome {
            Outcome::Allowed(state) => {
                decision.ratelimit = Some(state);
                if fallback {
                    decision.reason = Reason::AllowedStoreError;
                }
            }
            Outcome::Exceeded(state) => {
                // Limits of a list differ in (unit, interval): the one whose window ends when the state says
                // is the exhausted one.
                let limit = self
                    .limits
                    .iter()
                    .find(|l| {
                        l.limit == state.limit
                            && l.window(self.now).seconds_left(self.now) == state.reset_secs
                    })
                    .or_else(|| self.limits.iter().find(|l| l.limit == state.limit))
                    .copied();
                decision.reason = Reason::QuotaExceeded;
                decision.message = quota_message(self.product, limit, state);
                decision.ratelimit = Some(state);
                decision.retry_after = Some(state.reset_secs);
            }
        }
        decision
    }
}

/// What the quota step answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaAnswer {
    /// The quota store's answer.
    Store(Outcome),
    /// The store failed and `on_store_error` is `allow`: this replica's own count decided.
    Fallback(Outcome),
    /// The store failed and `on_store_error` is `deny`.
    Unavailable,
}

/// The API id: the configured context extension, else the `:authority` host without its port.
fn api_of<'a>(request: &Request<'a>, settings: &Settings) -> &'a str {
    if let Some(api) = settings
        .api_context_extension
        .as_deref()
        .and_then(|name| request.context_extensions.get(name))
    {
        return api;
    }
    host_of(request.authority)
}

fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

fn missing_credential_message(settings: &Settings) -> String {
    let config = &settings.api_key;
    let mut places = Vec::new();
    if settings.bearer {
        places.push("a bearer token in the authorization header".to_owned());
    }
    places.extend(
        config
            .headers
            .iter()
            .map(|h| format!("an API key in the {h} header")),
    );
    places.extend(
        config
            .query_params
            .iter()
            .map(|q| format!("an API key in the {q} query parameter")),
    );
    if places.is_empty() {
        return "no credential presented".into();
    }
    format!("no credential: send {}", places.join(" or "))
}

/// Client-supplied text echoed in a message (path, API id from `:authority`) is cut at this many characters.
const MAX_ECHOED: usize = 200;

fn no_product_message(owner: Owner<'_>, target: &Target<'_>) -> String {
    let mut message = format!("{} has no product for {} ", owner.label(), target.method);
    push_capped(&mut message, target.path.as_str());
    message.push_str(" on API ");
    push_capped(&mut message, target.api);
    message
}

/// Appends `text`, cut at [`MAX_ECHOED`] characters (marked with an ellipsis).
fn push_capped(message: &mut String, text: &str) {
    match text.char_indices().nth(MAX_ECHOED) {
        Some((cut, _)) => {
            message.push_str(&text[..cut]);
            message.push('…');
        }
        None => message.push_str(text),
    }
}

fn quota_message(product: &str, limit: Option<Limit>, state: LimitState) -> String {
    let per = match limit {
        Some(l) if l.interval == 1 => format!(" per {}", l.unit.as_str()),
        Some(l) => format!(" per {} {}s", l.interval, l.unit.as_str()),
        None => String::new(),
    };
    format!(
        "quota of {}{per} for product {product} is exhausted, retry in {} s",
        state.limit, state.reset_secs
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::parse;
    use crate::source::Source;

    const NOW: i64 = 1_795_000_000;

    const CATALOG: &str = "\
products:
  - name: free
    quota: {limit: 2, unit: minute}
    operations:
      - {api: weather, paths: [/forecast], methods: [GET]}
      - {api: weather, name: bulk, paths: [/bulk/**], quota: {limit: 100, unit: day}, cost: 10}
  - name: open
    operations: [{api: status.example.com, paths: [/]}]
  - name: prodonly
    environments: [prod]
    operations: [{api: weather, paths: [/prod]}]
  - name: pending
    approval: manual
    operations: [{api: weather, paths: [/pending]}]
  - name: revoked
    operations: [{api: weather, paths: [/revoked]}]
  - name: scoped
    scopes: [admin]
    operations: [{api: weather, paths: [/scoped]}]
developers:
  - email: ntesla@theremin.com
    company: theremin
    stripe_customer: cus_1
    apps:
      - name: weatherapp
        client_id: weatherapp-client
        products: [{name: free}, {name: open}, {name: prodonly}, {name: pending}, {name: revoked, status: revoked}, {name: scoped}]
        keys:
          - {hash: 'sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'}
          - {hash: 'sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d', status: revoked}
          - {hash: 'sha256:2e7d2c03a9507ae265ecf5b5356885a53393a2029d241394997265a1a25aefc6', expires_at: 2020-01-01T00:00:00Z}
      - name: banned
        client_id: banned-client
        status: revoked
        products: [{name: free}]
        keys: [{hash: 'sha256:18ac3e7343f016890c510e93f935261169d9e3f565436429830faf0934f4f8e4'}]
";
    // Keys: "abc" (good), "b" (revoked), "c" (expired), "d" (app revoked).

    struct World {
        catalog: Catalog,
        settings: Settings,
    }

    fn world() -> World {
        World {
            catalog: parse(&Source::from_text("c.yaml", CATALOG.to_owned())).unwrap(),
            settings: Settings {
                environment: Some("test".into()),
                api_context_extension: Some("tollgate_api".into()),
                api_key: ApiKeyConfig::default(),
                on_store_error: OnStoreError::Deny,
                on_store_error_by_api: HashMap::new(),
                bearer: false,
                upstream_identity_headers: true,
            },
        }
    }

    static NO_HEADERS: std::sync::LazyLock<HashMap<String, String>> =
        std::sync::LazyLock::new(HashMap::new);

    /// The caller presenting API key `key` in the x-api-key header (or nothing).
    fn headers(key: Option<&str>) -> Caller<'static> {
        match key {
            Some(k) => Caller::ApiKey {
                key: Cow::Owned(k.to_owned()),
            },
            None => Caller::Nothing,
        }
    }

    fn token(app: Option<&str>, products: &[&str], scopes: &[&str]) -> Caller<'static> {
        Caller::Token(Ok(std::sync::Arc::new(VerifiedToken {
            provider: "portal".into(),
            subject: Some("dev@portal".into()),
            developer: Some("dev@portal".into()),
            app: app.map(str::to_owned),
            company: Some("acme".into()),
            products: products.iter().map(|p| (*p).to_owned()).collect(),
            scopes: scopes.iter().map(|p| (*p).to_owned()).collect(),
            stripe_customer: None,
            expires_at: NOW + 60,
        })))
    }

    fn ext(api: &str) -> HashMap<String, String> {
        [("tollgate_api".to_owned(), api.to_owned())]
            .into_iter()
            .collect()
    }

    fn decide_now<'a>(
        w: &'a World,
        method: &'a str,
        path: &'a str,
        caller: &'a Caller<'a>,
        e: &'a HashMap<String, String>,
    ) -> Plan<'a> {
        let request = Request {
            method,
            path,
            authority: "status.example.com:8443",
            headers: &NO_HEADERS,
            context_extensions: e,
        };
        plan(&request, caller, &w.catalog, &w.settings, NOW)
    }

    fn decided(p: Plan<'_>) -> Decision<'_> {
        match p {
            Plan::Decided(d) => d,
            Plan::Charge(c) => panic!("expected a decision, got a charge for {}", c.bucket),
        }
    }

    #[test]
    fn credential_rows_of_the_decision_table() {
        let w = world();
        let e = ext("weather");
        let cases = [
            (
                None,
                Reason::MissingCredential,
                "no credential: send an API key in the x-api-key header or an API key in the apikey query parameter",
            ),
            (Some("nope"), Reason::UnknownKey, "API key is not valid"),
            (Some("b"), Reason::RevokedKey, "API key is revoked"),
            (Some("c"), Reason::ExpiredKey, "API key has expired"),
            (Some("d"), Reason::AppRevoked, "app banned is revoked"),
        ];
        for (key, reason, message) in cases {
            let h = headers(key);
            let d = decided(decide_now(&w, "GET", "/forecast", &h, &e));
            assert_eq!(
                (d.reason, d.message.as_str()),
                (reason, message),
                "key {key:?}"
            );
            assert!(!d.message.contains("nope"));
        }
        assert_eq!(Reason::MissingCredential.http_status(), 401);
        assert_eq!(Reason::AppRevoked.http_status(), 403);
    }

    #[test]
    fn entitlement_rows_of_the_decision_table() {
        let w = world();
        let h = headers(Some("abc"));
        let e = ext("weather");
        let cases = [
            (
                "GET",
                "/admin",
                Reason::NoProduct,
                "app weatherapp has no product for GET /admin on API weather",
            ),
            (
                "POST",
                "/forecast",
                Reason::NoProduct,
                "app weatherapp has no product for POST /forecast on API weather",
            ),
            (
                "GET",
                "/prod",
                Reason::ProductNotOffered,
                "product prodonly is not offered in environment test",
            ),
            (
                "GET",
                "/pending",
                Reason::ProductPending,
                "app weatherapp's subscription to product pending is pending approval",
            ),
            (
                "GET",
                "/revoked",
                Reason::ProductRevoked,
                "app weatherapp's subscription to product revoked is revoked",
            ),
            ("GET", "/a/../forecast", Reason::BadPath, ""),
        ];
        for (method, path, reason, message) in cases {
            let d = decided(decide_now(&w, method, path, &h, &e));
            assert_eq!(d.reason, reason, "{method} {path}");
            assert!(
                d.message.starts_with(message),
                "{method} {path}: {}",
                d.message
            );
            assert_eq!(d.reason.http_status() / 100, 4);
        }
    }

    #[test]
    fn an_allowed_request_carries_identity_and_a_charge() {
        let w = world();
        let h = headers(Some("abc"));
        let e = ext("weather");
        let Plan::Charge(pending) = decide_now(&w, "GET", "/forecast?apikey=zzz&x=1", &h, &e)
        else {
            panic!("expected a charge");
        };
        let charge = pending.charge(NOW);
        assert_eq!(charge.bucket, "weatherapp\u{1f}free");
        assert_eq!(charge.cost, 1);
        let d = pending.finish(QuotaAnswer::Store(Outcome::Allowed(LimitState {
            limit: 2,
            remaining: 1,
            reset_secs: 20,
        })));
        assert!(d.allowed());
        assert_eq!(
            d.identity,
            Identity {
                app: Some("weatherapp"),
                developer: Some("ntesla@theremin.com"),
                company: Some("theremin"),
                stripe_customer: Some("cus_1"),
                product: Some("free"),
                operation: Some("weather GET /forecast"),
            }
        );
        assert_eq!(d.environment, Some("test"));
    }

    #[test]
    fn app_quotas_name_exactly_the_buckets_that_calls_charge() {
        let w = world();
        let app = w
            .catalog
            .apps()
            .iter()
            .find(|a| a.name == "weatherapp")
            .expect("weatherapp");
        let quotas = app_quotas(&w.catalog, app);
        let listed: Vec<(&str, Option<&str>, &str, u64)> = quotas
            .iter()
            .map(|q| (q.product, q.operation, q.bucket.as_str(), q.limits[0].limit))
            .collect();
        assert_eq!(
            listed,
            [
                ("free", None, "weatherapp\u{1f}free", 2),
                ("free", Some("bulk"), "weatherapp\u{1f}free\u{1f}bulk", 100),
            ]
        );
        let h = headers(Some("abc"));
        let e = ext("weather");
        for (method, path) in [("GET", "/forecast"), ("POST", "/bulk/x")] {
            let Plan::Charge(pending) = decide_now(&w, method, path, &h, &e) else {
                panic!("expected a charge for {method} {path}");
            };
            let charge = pending.charge(NOW);
            assert!(
                quotas
                    .iter()
                    .any(|q| q.bucket == charge.bucket && q.limits == charge.limits),
                "{method} {path} charges {:?}, which app_quotas does not list",
                charge.bucket
            );
        }
    }

    #[test]
    fn operation_quota_replaces_the_product_quota_and_has_its_own_bucket() {
        let w = world();
        let h = headers(Some("abc"));
        let e = ext("weather");
        let Plan::Charge(pending) = decide_now(&w, "POST", "/bulk/x/y", &h, &e) else {
            panic!("expected a charge");
        };
        let charge = pending.charge(NOW);
        assert_eq!(charge.bucket, "weatherapp\u{1f}free\u{1f}bulk");
        assert_eq!(charge.cost, 10);
        assert_eq!(charge.limits[0].limit, 100);
    }

    #[test]
    fn exhausted_quota_and_store_failures() {
        let w = world();
        let h = headers(Some("abc"));
        let e = ext("weather");
        let take = || match decide_now(&w, "GET", "/forecast", &h, &e) {
            Plan::Charge(p) => p,
            Plan::Decided(d) => panic!("expected a charge, got {d:?}"),
        };
        let state = LimitState {
            limit: 2,
            remaining: 0,
            reset_secs: 42,
        };
        let d = take().finish(QuotaAnswer::Store(Outcome::Exceeded(state)));
        assert_eq!(d.reason, Reason::QuotaExceeded);
        assert_eq!(d.retry_after, Some(42));
        assert_eq!(
            d.message,
            "quota of 2 per minute for product free is exhausted, retry in 42 s"
        );
        assert_eq!(d.reason.http_status(), 429);

        let d = take().finish(QuotaAnswer::Unavailable);
        assert_eq!(
            (d.reason, d.reason.http_status()),
            (Reason::StoreUnavailable, 503)
        );
        let local = LimitState {
            limit: 2,
            remaining: 1,
            reset_secs: 42,
        };
        let d = take().finish(QuotaAnswer::Fallback(Outcome::Allowed(local)));
        assert_eq!(d.reason, Reason::AllowedStoreError);
        assert!(d.allowed());
        assert_eq!(d.ratelimit, Some(local));
        let d = take().finish(QuotaAnswer::Fallback(Outcome::Exceeded(state)));
        assert_eq!(d.reason, Reason::QuotaExceeded);
    }

    #[test]
    fn store_failure_policy_can_be_overridden_per_api() {
        let mut w = world();
        w.settings
            .on_store_error_by_api
            .insert("public".into(), OnStoreError::Allow);
        assert_eq!(w.settings.on_store_error_for("weather"), OnStoreError::Deny);
        assert_eq!(w.settings.on_store_error_for("public"), OnStoreError::Allow);
        let h = headers(Some("abc"));
        let e = ext("weather");
        let Plan::Charge(pending) = decide_now(&w, "GET", "/forecast", &h, &e) else {
            panic!("expected a charge");
        };
        assert_eq!(pending.on_store_error(&w.settings), OnStoreError::Deny);
    }

    #[test]
    fn api_comes_from_the_context_extension_else_the_host() {
        let w = world();
        let h = headers(Some("abc"));
        let none = HashMap::new();
        // No context extension: the :authority host without its port is the API.
        let d = decided(decide_now(&w, "GET", "/anything", &h, &none));
        assert_eq!((d.reason, d.api), (Reason::Allowed, "status.example.com"));
        assert_eq!(host_of("[::1]:8080"), "[::1]");
        assert_eq!(host_of("example.com"), "example.com");
    }

    #[test]
    fn dangerous_paths_are_refused_before_identity() {
        let w = world();
        let h = headers(None);
        let e = ext("weather");
        for path in ["/a/%2e%2e/b", "/a%2fb", "/a\\b", "/a%00"] {
            let d = decided(decide_now(&w, "GET", path, &h, &e));
            assert_eq!(d.reason, Reason::BadPath, "{path}");
            assert_eq!(d.reason.error_code(), "bad_request");
        }
    }

    #[test]
    fn token_callers_resolve_to_catalog_apps_by_client_id() {
        let w = world();
        let e = ext("weather");
        let t = token(Some("weatherapp-client"), &[], &["read"]);
        let Plan::Charge(pending) = decide_now(&w, "GET", "/forecast", &t, &e) else {
            panic!("expected a charge");
        };
        assert_eq!(pending.charge(NOW).bucket, "weatherapp\u{1f}free");
        let d = pending.finish(QuotaAnswer::Store(Outcome::Allowed(LimitState {
            limit: 2,
            remaining: 1,
            reset_secs: 1,
        })));
        // The catalog, not the token, names the developer of a catalog app.
        assert_eq!(d.identity.app, Some("weatherapp"));
        assert_eq!(d.identity.developer, Some("ntesla@theremin.com"));
        // A product with scopes refuses a token without one of them.
        let d = decided(decide_now(&w, "GET", "/scoped", &t, &e));
        assert_eq!(d.reason, Reason::MissingScope);
        assert_eq!(
            d.message,
            "token has no scope that product scoped requires (one of: admin)"
        );
        let admin = token(Some("weatherapp-client"), &[], &["admin"]);
        assert_eq!(
            decided(decide_now(&w, "GET", "/scoped", &admin, &e)).reason,
            Reason::Allowed
        );
        // An unknown app is refused; a revoked one too.
        let unknown = token(Some("nobody"), &[], &[]);
        assert_eq!(
            decided(decide_now(&w, "GET", "/forecast", &unknown, &e)).reason,
            Reason::UnknownApp
        );
        let banned = token(Some("banned-client"), &[], &[]);
        assert_eq!(
            decided(decide_now(&w, "GET", "/forecast", &banned, &e)).reason,
            Reason::AppRevoked
        );
    }

    #[test]
    fn portal_tokens_are_entitled_by_their_products_claim() {
        let w = world();
        let e = ext("weather");
        let t = token(None, &["free", "no-such-product"], &[]);
        let Plan::Charge(pending) = decide_now(&w, "GET", "/forecast", &t, &e) else {
            panic!("expected a charge");
        };
        // The company owns the bucket, apart from every app's buckets.
        assert_eq!(pending.charge(NOW).bucket, "\u{1e}acme\u{1f}free");
        let d = pending.finish(QuotaAnswer::Store(Outcome::Allowed(LimitState {
            limit: 2,
            remaining: 1,
            reset_secs: 1,
        })));
        assert_eq!(
            (d.identity.app, d.identity.developer, d.identity.company),
            (None, Some("dev@portal"), Some("acme"))
        );
        let d = decided(decide_now(&w, "GET", "/prod", &t, &e));
        assert_eq!(d.reason, Reason::NoProduct);
        assert_eq!(
            d.message,
            "account acme has no product for GET /prod on API weather"
        );
        let nothing = token(None, &[], &[]);
        assert_eq!(
            decided(decide_now(&w, "GET", "/forecast", &nothing, &e)).reason,
            Reason::NoProduct
        );
    }

    #[test]
    fn refused_tokens_say_why_without_echoing_them() {
        let w = world();
        let e = ext("weather");
        let expired = Caller::Token(Err(JwtRejection::Expired));
        let d = decided(decide_now(&w, "GET", "/forecast", &expired, &e));
        assert_eq!(
            (d.reason, d.message.as_str()),
            (Reason::InvalidToken, "token has expired")
        );
        assert_eq!(d.reason.http_status(), 401);
        let keys = Caller::Token(Err(JwtRejection::KeysUnavailable));
        assert_eq!(
            decided(decide_now(&w, "GET", "/forecast", &keys, &e))
                .reason
                .http_status(),
            503
        );
    }
}
