//! The product catalog: products and their operations, developers, apps and their keys.
//!
//! A [`Catalog`] is an immutable snapshot, validated as a whole when it is loaded ([`load`]); request
//! handling reads the current snapshot without locks through [`CatalogHandle`], and a reload swaps in a new
//! one atomically ([`watch`]).

pub mod keys;
mod load;
pub mod metrics;
pub mod remote;
pub mod watch;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use crate::credits::Prepaid;
use crate::identity::api_key::KeyHash;
use crate::matching::path::PathPattern;
use crate::paywall::access::PriceRef;
use crate::paywall::model::PaidSubscription;
use crate::quota::Limit;
use keys::KeyTable;

pub use load::{load, parse};

/// Index of a product in [`Catalog::products`].
pub type ProductId = usize;
/// Index of an app in [`Catalog::apps`].
pub type AppId = usize;
/// Index of a developer in [`Catalog::developers`].
pub type DeveloperId = usize;

/// How subscriptions to a product are approved when an app entry does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Approval {
    /// Subscriptions are approved unless the app entry says otherwise.
    #[default]
    Auto,
    /// Subscriptions are pending unless the app entry says `approved`.
    Manual,
}

/// The state of an app's subscription to a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubscriptionStatus {
    /// Calls may use the product.
    Approved,
    /// Waiting for approval: calls are refused (403).
    Pending,
    /// Withdrawn: calls are refused (403).
    Revoked,
    /// Sold through Stripe, and its subscription is past due beyond the grace period, unpaid or incomplete
    /// (402). Only the Check sets it, from Stripe's state; it is never written or stored.
    #[serde(skip)]
    PaymentRequired,
    /// Sold through Stripe, and no subscription of the customer is in force for it (403). Only the Check sets
    /// it.
    #[serde(skip)]
    Unsubscribed,
}

impl SubscriptionStatus {
    /// The name the catalog and the API use.
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Approved => "approved",
            SubscriptionStatus::Pending => "pending",
            SubscriptionStatus::Revoked => "revoked",
            SubscriptionStatus::PaymentRequired => "payment_required",
            SubscriptionStatus::Unsubscribed => "unsubscribed",
        }
    }
}

/// The state of an app or a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// In force: the app or key may call.
    #[default]
    Approved,
    /// Withdrawn: every call is refused with 401 (key) or 403 (app).
    Revoked,
}

impl Status {
    /// The name the catalog and the API use.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Approved => "approved",
            Status::Revoked => "revoked",
        }
    }
}

/// What a meter counts per billable call (CONTRACT §3 `meter.value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeterValue {
    /// One per call.
    Calls,
    /// Request body bytes.
    RequestBytes,
    /// Response body bytes.
    ResponseBytes,
    /// The integer value of this response header (lowercase name).
    ResponseHeader(String),
    /// A value the response body reported, read by ext_proc (CONTRACT §11): `genai:input_tokens`,
    /// `genai:output_tokens`, `genai:total_tokens` or `response_json:<JSON pointer>`.
    Usage(String),
}

/// A quota that counts a meter value (tokens) instead of calls: each call holds `reserve` at the Check and
/// is settled to what its response reported (CONTRACT §11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenQuota {
    /// The usage key counted, as [`MeterValue::Usage`] names it.
    pub counts: String,
    /// Units held per call until its response ends; a call is admitted only while this fits.
    pub reserve: u64,
}

/// A response status class or code that makes a call billable (`2xx` or `201`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMatch {
    /// Every status of this hundred (2 for `2xx`).
    Class(u16),
    /// Exactly this status.
    Code(u16),
}

/// How a product's calls are metered for billing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    /// The Stripe meter's event name.
    pub event_name: String,
    /// What one call adds.
    pub value: MeterValue,
    /// Which response statuses count.
    pub success: Vec<StatusMatch>,
}

/// A set of operations sold together, with a quota and a meter.
#[derive(Debug, Clone)]
pub struct Product {
    /// The name subscriptions, metadata and meters use; unique in the catalog.
    pub name: String,
    /// Name for people.
    pub display_name: Option<String>,
    /// Environments the product is offered in; empty means all.
    pub environments: Vec<String>,
    /// Default approval of subscriptions.
    pub approval: Approval,
    /// JWT callers need one of these scopes (API-key callers are not checked).
    pub scopes: Vec<String>,
    /// The product-wide quota (empty: unlimited).
    pub quota: Vec<Limit>,
    /// What the product covers, tried in order.
    pub operations: Vec<Operation>,
    /// Billing meter, if the product is billed.
    pub meter: Option<Meter>,
    /// Stripe prices that sell the product: a subscription to one of them grants it (CONTRACT §8).
    pub stripe_prices: Vec<PriceRef>,
    /// Calls spend credits of the owner's prepaid balance (CONTRACT §9).
    pub prepaid: Option<Prepaid>,
    /// Stripe price ids whose paid invoice lines add this many credits per unit.
    pub credit_prices: Vec<(String, u64)>,
    /// Custom attributes (Apigee's), for people and for `metadata_attributes`.
    pub attributes: BTreeMap<String, String>,
    /// When the product's quota counts tokens: what and how much a call reserves.
    pub quota_tokens: Option<TokenQuota>,
}

impl Product {
    /// Whether the product is offered in `environment` (`None`: the sidecar names no environment, so only
    /// products offered everywhere are).
    pub fn offered_in(&self, environment: Option<&str>) -> bool {
        self.environments.is_empty()
            || environment.is_some_and(|env| self.environments.iter().any(|e| e == env))
    }
}

/// One API surface of a product: an API, paths and methods.
#[derive(Debug, Clone)]
pub struct Operation {
    /// Name, unique within the product (reported as `operation` in metadata).
    pub name: String,
    /// The API id this operation belongs to.
    pub api: String,
    /// Path patterns (any may match).
    pub paths: Vec<PathPattern>,
    /// Uppercase methods; empty means every method.
    pub methods: Vec<String>,
    /// The operation's own quota, which replaces the product's when present.
    pub quota: Option<Vec<Limit>>,
    /// When the operation's own quota counts tokens: what and how much a call reserves.
    pub quota_tokens: Option<TokenQuota>,
    /// Operations of a product with the same group share one counter of their (equal) quota, as an Apigee
    /// operation configuration's operations do.
    pub quota_group: Option<String>,
    /// The product's attributes overlaid with the operation's own: what `metadata_attributes` reads.
    pub attributes: Arc<BTreeMap<String, String>>,
    /// Units one call spends.
    pub cost: u64,
    /// Credits one call spends, overriding the product's `prepaid.cost`.
    pub prepaid_cost: Option<u64>,
}

impl Operation {
    /// The name of the counter the operation's own quota lives under: its group's, else its own.
    pub fn counter(&self) -> &str {
        self.quota_group.as_deref().unwrap_or(&self.name)
    }
}

/// A developer (a person or a company account) who owns apps.
#[derive(Debug, Clone)]
pub struct Developer {
    /// Unique e-mail.
    pub email: String,
    /// Company the developer belongs to.
    pub company: Option<String>,
    /// Stripe customer that pays for the developer's usage.
    pub stripe_customer: Option<String>,
}

/// An app's subscription to a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    /// The product subscribed to.
    pub product: ProductId,
    /// Its approval state for this app.
    pub status: SubscriptionStatus,
}

/// An application registered by a developer.
#[derive(Debug, Clone)]
pub struct App {
    /// The name metadata and upstream headers carry; unique in the catalog.
    pub name: String,
    /// The developer who registered it, and whose Stripe customer it bills to.
    pub developer: DeveloperId,
    /// Whether the app may call at all.
    pub status: Status,
    /// What a JWT's app claim carries for this app.
    pub client_id: Option<String>,
    /// Products in catalog order: the first one that covers a request wins.
    pub products: Vec<Subscription>,
}

/// An API key, known only by its hash.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// The stored hash, compared in constant time after the lookup.
    pub hash: KeyHash,
    /// The app the key belongs to.
    pub app: AppId,
    /// Whether the key may be used.
    pub status: Status,
    /// Unix seconds after which the key is refused.
    pub expires_at: Option<i64>,
}

/// An immutable, validated catalog: the catalog file's entities, and the state store's once merged in
/// ([`crate::state::snapshot`]).
///
/// Developers and apps sit in persistent maps (HAMTs with structural sharing), keys in a [`KeyTable`] (a flat
/// table shared by copies plus a persistent delta): a copy costs O(1) and an edit of the copy O(log n), so one
/// revoked key among a million makes a new snapshot without rebuilding it.
/// Products come only from the file and are shared, unchanged, by every snapshot built from it.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    products: Arc<Vec<Product>>,
    products_by_name: Arc<HashMap<String, ProductId>>,
    /// Products with `stripe_prices`, in catalog order.
    sold: Arc<Vec<ProductId>>,
    /// Credits per unit of every `stripe_credit_prices` price, catalog-wide.
    credit_prices: Arc<HashMap<String, u64>>,
    developers: imbl::HashMap<DeveloperId, Arc<Developer>>,
    apps: imbl::HashMap<AppId, Arc<App>>,
    keys: KeyTable,
    apps_by_name: imbl::HashMap<String, AppId>,
    apps_by_client_id: imbl::HashMap<String, AppId>,
    developers_by_email: imbl::HashMap<String, DeveloperId>,
    /// Stripe subscriptions by customer, from the state store.
    customers: imbl::HashMap<String, Arc<[PaidSubscription]>>,
}

impl Catalog {
    /// Products sold through Stripe (with `stripe_prices`), in catalog order.
    pub fn sold_through_stripe(&self) -> &[ProductId] {
        &self.sold
    }

    /// Credits one unit of a Stripe price tops a balance up by, when some product lists it.
    pub fn credit_price(&self, price: &str) -> Option<u64> {
        self.credit_prices.get(price).copied()
    }

    /// A Stripe customer's subscriptions as last read (empty when none are known).
    pub fn paid_subscriptions(&self, customer: &str) -> &[PaidSubscription] {
        self.customers.get(customer).map_or(&[], |s| &**s)
    }

    /// Every Stripe customer the catalog names: developers' and those with known subscriptions.
    pub fn stripe_customers(&self) -> std::collections::BTreeSet<&str> {
        self.developers
            .values()
            .filter_map(|d| d.stripe_customer.as_deref())
            .chain(self.customers.keys().map(String::as_str))
            .collect()
    }

    /// Sets a customer's subscriptions (none: forgets the customer).
    pub fn put_customer(&mut self, customer: &str, subscriptions: Vec<PaidSubscription>) {
        if subscriptions.is_empty() {
            self.customers.remove(customer);
        } else {
            self.customers
                .insert(customer.to_owned(), Arc::from(subscriptions));
        }
    }

    /// Every product, in catalog order.
    pub fn products(&self) -> &[Product] {
        &self.products
    }

    /// Every developer (in no particular order).
    pub fn developers(&self) -> impl Iterator<Item = &Developer> {
        self.developers.values().map(|d| &**d)
    }

    /// Number of developers.
    pub fn developer_count(&self) -> usize {
        self.developers.len()
    }

    /// Every app with its id (in no particular order).
    pub fn apps(&self) -> impl Iterator<Item = (AppId, &App)> {
        self.apps.iter().map(|(id, app)| (*id, &**app))
    }

    /// Number of apps.
    pub fn app_count(&self) -> usize {
        self.apps.len()
    }

    /// Number of keys.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Every key (in no particular order).
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.keys.iter()
    }

    /// A product by id.
    pub fn product(&self, id: ProductId) -> Option<&Product> {
        self.products.get(id)
    }

    /// An app by id.
    pub fn app(&self, id: AppId) -> Option<&App> {
        self.apps.get(&id).map(|a| &**a)
    }

    /// A developer by id.
    pub fn developer(&self, id: DeveloperId) -> Option<&Developer> {
        self.developers.get(&id).map(|d| &**d)
    }

    /// The key whose hash is `hash`: a lookup by hash, then a constant-time compare of the stored hash.
    pub fn key(&self, hash: &KeyHash) -> Option<&Key> {
        self.keys.get(hash).filter(|k| k.hash.ct_eq(hash))
    }

    /// A product by name.
    pub fn product_id(&self, name: &str) -> Option<ProductId> {
        self.products_by_name.get(name).copied()
    }

    /// The developer with this e-mail (a portal token's developer claim).
    pub fn developer_by_email(&self, email: &str) -> Option<&Developer> {
        self.developer_id(email).and_then(|id| self.developer(id))
    }

    /// The id of the developer with this e-mail.
    pub fn developer_id(&self, email: &str) -> Option<DeveloperId> {
        self.developers_by_email.get(email).copied()
    }

    /// The app a JWT's app claim names.
    pub fn app_by_client_id(&self, client_id: &str) -> Option<AppId> {
        self.apps_by_client_id.get(client_id).copied()
    }

    /// The id of the app with this name.
    pub fn app_id(&self, name: &str) -> Option<AppId> {
        self.apps_by_name.get(name).copied()
    }

    /// The app with this name.
    pub fn app_by_name(&self, name: &str) -> Option<&App> {
        self.app_id(name).and_then(|id| self.app(id))
    }

    /// This catalog's products with no developers, apps or keys: the base a merge starts from.
    pub fn products_only(&self) -> Catalog {
        Catalog {
            products: Arc::clone(&self.products),
            products_by_name: Arc::clone(&self.products_by_name),
            sold: Arc::clone(&self.sold),
            credit_prices: Arc::clone(&self.credit_prices),
            ..Catalog::default()
        }
    }

    /// Takes `other`'s products (store entities are then re-resolved against them by the caller).
    pub fn set_products_from(&mut self, other: &Catalog) {
        self.products = Arc::clone(&other.products);
        self.products_by_name = Arc::clone(&other.products_by_name);
        self.sold = Arc::clone(&other.sold);
        self.credit_prices = Arc::clone(&other.credit_prices);
    }

    /// Adds or replaces the developer `id`.
    pub fn put_developer(&mut self, id: DeveloperId, developer: Arc<Developer>) {
        if let Some(old) = self.developers.get(&id)
            && old.email != developer.email
        {
            self.developers_by_email.remove(&old.email);
        }
        self.developers_by_email.insert(developer.email.clone(), id);
        self.developers.insert(id, developer);
    }

    /// Removes the developer `id` (its apps stay until they are removed themselves).
    pub fn remove_developer(&mut self, id: DeveloperId) {
        if let Some(old) = self.developers.remove(&id) {
            self.developers_by_email.remove(&old.email);
        }
    }

    /// Adds or replaces the app `id`.
    pub fn put_app(&mut self, id: AppId, app: Arc<App>) {
        self.remove_app(id);
        self.apps_by_name.insert(app.name.clone(), id);
        if let Some(client_id) = &app.client_id {
            self.apps_by_client_id.insert(client_id.clone(), id);
        }
        self.apps.insert(id, app);
    }

    /// Removes the app `id` (its keys stay, and find no app: they are refused).
    pub fn remove_app(&mut self, id: AppId) {
        if let Some(old) = self.apps.remove(&id) {
            self.apps_by_name.remove(&old.name);
            if let Some(client_id) = &old.client_id
                && self.apps_by_client_id.get(client_id) == Some(&id)
            {
                self.apps_by_client_id.remove(client_id);
            }
        }
    }

    /// Adds or replaces a key.
    pub fn put_key(&mut self, key: Key) {
        self.keys.insert(key);
    }

    /// Adds or replaces many keys at once (a full read of the state store).
    pub fn put_keys(&mut self, keys: impl IntoIterator<Item = Key>) {
        if self.keys.is_empty() {
            self.keys = KeyTable::from_keys(keys);
        } else {
            self.keys.extend(keys);
        }
    }

    /// Removes the key with this hash.
    pub fn remove_key(&mut self, hash: &KeyHash) {
        self.keys.remove(hash);
    }

    /// Adds every developer, app and key of `other` to this catalog, whose ids and names must not clash with
    /// them: the merge of the file's entities into the store's.
    pub fn absorb(&mut self, other: &Catalog) {
        for (id, developer) in &other.developers {
            self.put_developer(*id, Arc::clone(developer));
        }
        for (id, app) in &other.apps {
            self.put_app(*id, Arc::clone(app));
        }
        self.keys.extend(other.keys.iter().copied());
    }
}

/// The current catalog, read lock-free by requests and replaced atomically on reload.
#[derive(Debug)]
pub struct CatalogHandle {
    current: ArcSwap<Catalog>,
    /// How many times the snapshot was replaced (the memory releaser purges after each).
    replaced: AtomicU64,
}

impl CatalogHandle {
    /// A handle serving `catalog`.
    pub fn new(catalog: Catalog) -> Self {
        CatalogHandle {
            current: ArcSwap::from_pointee(catalog),
            replaced: AtomicU64::new(0),
        }
    }

    /// How many times the snapshot was replaced since the handle was made.
    pub fn replacements(&self) -> u64 {
        self.replaced.load(Ordering::Relaxed)
    }

    /// The current snapshot; it stays valid for as long as the caller holds it, even across a reload.
    pub fn snapshot(&self) -> Arc<Catalog> {
        self.current.load_full()
    }

    /// Makes `catalog` the current snapshot.
    pub fn replace(&self, catalog: Catalog) {
        self.current.store(Arc::new(catalog));
        self.replaced.fetch_add(1, Ordering::Relaxed);
    }
}
