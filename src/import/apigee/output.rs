//! The tollgate catalog an import writes (CONTRACT §3), as serde types in the order a reader expects.

use std::collections::BTreeMap;

use serde::Serialize;

/// The whole catalog.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Catalog {
    /// Products, by name.
    pub products: Vec<Product>,
    /// Developers (and companies that own apps), by email.
    pub developers: Vec<Developer>,
}

/// One product.
#[derive(Debug, Serialize, PartialEq)]
pub struct Product {
    /// Unique name (Apigee's).
    pub name: String,
    /// Apigee's displayName.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Environments (never empty: an empty list would mean every environment).
    pub environments: Vec<String>,
    /// `auto` or `manual`.
    pub approval: &'static str,
    /// OAuth scopes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// The product quota, charged by operations without one of their own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<Limit>,
    /// Custom attributes.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// What the product covers.
    pub operations: Vec<Operation>,
}

/// A quota limit.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Limit {
    /// Calls per window.
    pub limit: u64,
    /// Window length in units.
    pub interval: u32,
    /// `second`, `minute`, `hour`, `day`, `week` or `month`.
    pub unit: &'static str,
}

/// One operation of a product.
#[derive(Debug, Serialize, PartialEq)]
pub struct Operation {
    /// Unique within the product.
    pub name: String,
    /// The API (Apigee's proxy or remote service target).
    pub api: String,
    /// Path patterns.
    pub paths: Vec<String>,
    /// Methods; empty is every method.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// The operationConfig's own quota.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<Limit>,
    /// Operations of one product with the same group share one counter (one Apigee operationConfig).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_group: Option<String>,
    /// The operationConfig's custom attributes.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// A developer, or a company that owns apps.
#[derive(Debug, Serialize, PartialEq)]
pub struct Developer {
    /// Unique email (a company's name for a company).
    pub email: String,
    /// The company.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub company: Option<String>,
    /// Apps, by name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<App>,
}

/// An app.
#[derive(Debug, Serialize, PartialEq)]
pub struct App {
    /// Unique in the catalog.
    pub name: String,
    /// `approved` or `revoked`.
    pub status: &'static str,
    /// Products with their statuses, by name.
    pub products: Vec<Subscription>,
    /// Keys, by hash.
    pub keys: Vec<Key>,
}

/// An app's product and its status.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Subscription {
    /// The product's name.
    pub name: String,
    /// `approved`, `pending` or `revoked`.
    pub status: &'static str,
}

/// An API key, by hash.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    /// `sha256:` + 64 lowercase hex.
    pub hash: String,
    /// `approved` or `revoked`.
    pub status: &'static str,
    /// RFC 3339, UTC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}
