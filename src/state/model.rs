//! What the state store holds, as plain values: records read back, and the writes the API makes.

use std::collections::BTreeMap;

use crate::catalog::{Status, SubscriptionStatus};
use crate::identity::api_key::KeyHash;
use crate::paywall::model::{Observation, PaidSubscription};

/// Free-form name/value pairs a portal keeps on a developer or an app (Apigee's custom attributes).
pub type Attributes = BTreeMap<String, String>;

/// A developer as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeveloperRecord {
    /// The row id; stable for the developer's life.
    pub id: i64,
    /// Unique e-mail, the developer's name in the API.
    pub email: String,
    /// Company the developer belongs to.
    pub company: Option<String>,
    /// Stripe customer that pays for the developer's usage.
    pub stripe_customer: Option<String>,
    /// Portal attributes.
    pub attributes: Attributes,
    /// Unix seconds of creation.
    pub created_at: i64,
    /// Unix seconds of the last change.
    pub updated_at: i64,
}

/// An app's subscription to a product, by product name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRecord {
    /// The catalog product.
    pub product: String,
    /// approved | pending | revoked.
    pub status: SubscriptionStatus,
}

/// An app as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRecord {
    /// The row id; stable for the app's life.
    pub id: i64,
    /// Unique name, the app's name in the API and in metadata.
    pub name: String,
    /// The owning developer's row id.
    pub developer_id: i64,
    /// The owning developer's e-mail.
    pub developer: String,
    /// What a JWT's app claim carries for this app.
    pub client_id: Option<String>,
    /// approved | revoked.
    pub status: Status,
    /// Subscriptions, in the order products are tried.
    pub products: Vec<SubscriptionRecord>,
    /// Portal attributes.
    pub attributes: Attributes,
    /// Unix seconds of creation.
    pub created_at: i64,
    /// Unix seconds of the last change.
    pub updated_at: i64,
}

/// An API key as the store holds it: its hash, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Public id (`key_…`), the key's name in the API.
    pub id: String,
    /// The app's row id.
    pub app_id: i64,
    /// SHA-256 of the key.
    pub hash: KeyHash,
    /// The key's first characters, for people to tell keys apart.
    pub prefix: String,
    /// A label chosen at creation.
    pub name: Option<String>,
    /// approved | revoked.
    pub status: Status,
    /// Unix seconds of creation.
    pub created_at: i64,
    /// Unix seconds after which the key is refused.
    pub expires_at: Option<i64>,
}

/// What a replica's snapshot needs of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredKey {
    /// SHA-256 of the key.
    pub hash: KeyHash,
    /// The app's row id.
    pub app_id: i64,
    /// approved | revoked.
    pub status: Status,
    /// Unix seconds after which the key is refused.
    pub expires_at: Option<i64>,
}

/// A developer to create or replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeveloperInput {
    /// The developer's e-mail.
    pub email: String,
    /// Company.
    pub company: Option<String>,
    /// Stripe customer.
    pub stripe_customer: Option<String>,
    /// Portal attributes.
    pub attributes: Attributes,
}

/// An app to create or replace; subscription statuses are already resolved against the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppInput {
    /// The app's name.
    pub name: String,
    /// The owning developer's e-mail (must exist in the store).
    pub developer: String,
    /// JWT app claim value.
    pub client_id: Option<String>,
    /// approved | revoked.
    pub status: Status,
    /// Subscriptions in order.
    pub products: Vec<SubscriptionRecord>,
    /// Portal attributes.
    pub attributes: Attributes,
}

/// A key to store (its secret was shown to the caller and is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    /// Public id.
    pub id: String,
    /// SHA-256 of the key.
    pub hash: KeyHash,
    /// The key's first characters.
    pub prefix: String,
    /// Label.
    pub name: Option<String>,
    /// Unix seconds after which the key is refused.
    pub expires_at: Option<i64>,
}

/// One management change, applied by the store in one transaction with its change and audit rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Creates or replaces a developer.
    PutDeveloper(DeveloperInput),
    /// Deletes a developer with its apps and their keys.
    DeleteDeveloper {
        /// The developer's e-mail.
        email: String,
    },
    /// Creates or replaces an app (an existing app keeps its keys and must keep its developer).
    PutApp(AppInput),
    /// Deletes an app and its keys.
    DeleteApp {
        /// The app's name.
        name: String,
    },
    /// Sets one subscription's status (adding the subscription when the app has none to the product).
    SetSubscription {
        /// The app's name.
        app: String,
        /// The product's name.
        product: String,
        /// The new status.
        status: SubscriptionStatus,
    },
    /// Adds a key to an app.
    CreateKey {
        /// The app's name.
        app: String,
        /// The key.
        key: NewKey,
    },
    /// Adds a key to an app and makes an old one expire at `old_expires_at` (or earlier, when it already
    /// expires sooner).
    RotateKey {
        /// The app's name.
        app: String,
        /// The key being replaced.
        old: String,
        /// When the old key stops working.
        old_expires_at: i64,
        /// The replacement.
        key: NewKey,
    },
    /// Revokes a key.
    RevokeKey {
        /// The app's name.
        app: String,
        /// The key's id.
        id: String,
    },
    /// Folds what Stripe said of a subscription into the stored one (an older observation changes nothing),
    /// and marks the webhook event it came from applied.
    Observe {
        /// The subscription's customer.
        customer: String,
        /// What was seen.
        observation: Observation,
        /// Where it was learned: an event id, `fetch` or `resync`.
        source: String,
        /// The webhook event to mark applied.
        event: Option<String>,
    },
}

impl Write {
    /// The audit table's name of this change.
    pub fn action(&self) -> &'static str {
        match self {
            Write::PutDeveloper(_) => "developer.put",
            Write::DeleteDeveloper { .. } => "developer.delete",
            Write::PutApp(_) => "app.put",
            Write::DeleteApp { .. } => "app.delete",
            Write::SetSubscription { .. } => "subscription.set",
            Write::CreateKey { .. } => "key.create",
            Write::RotateKey { .. } => "key.rotate",
            Write::RevokeKey { .. } => "key.revoke",
            Write::Observe { .. } => "stripe.observe",
        }
    }

    /// What the change is about, for the audit table (`developer:…`, `app:…`, `app:…/key:…`).
    pub fn target(&self) -> String {
        match self {
            Write::PutDeveloper(d) => format!("developer:{}", d.email),
            Write::DeleteDeveloper { email } => format!("developer:{email}"),
            Write::PutApp(a) => format!("app:{}", a.name),
            Write::DeleteApp { name } => format!("app:{name}"),
            Write::SetSubscription { app, product, .. } => format!("app:{app}/product:{product}"),
            Write::CreateKey { app, key } => format!("app:{app}/key:{}", key.id),
            Write::RotateKey { app, old, key, .. } => {
                format!("app:{app}/key:{old}->{}", key.id)
            }
            Write::RevokeKey { app, id } => format!("app:{app}/key:{id}"),
            Write::Observe {
                customer,
                observation,
                source,
                ..
            } => format!(
                "customer:{customer}/subscription:{} from {source}",
                observation.subscription()
            ),
        }
    }
}

/// What a write left in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// The developer as stored; `created` when it did not exist.
    Developer {
        /// Whether the write created it.
        created: bool,
        /// The stored developer.
        record: DeveloperRecord,
    },
    /// The app as stored; `created` when it did not exist.
    App {
        /// Whether the write created it.
        created: bool,
        /// The stored app.
        record: AppRecord,
    },
    /// The key created, rotated to or revoked.
    Key(KeyRecord),
    /// The entity is gone.
    Deleted,
    /// A Stripe subscription as it now stands, when the observation changed it.
    Paid(Option<PaidSubscription>),
}

/// One entity a change names, as it is now (`None`: it no longer exists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// A developer, by e-mail.
    Developer {
        /// The e-mail the change names.
        email: String,
        /// The developer now.
        now: Option<DeveloperRecord>,
    },
    /// An app, by name.
    App {
        /// The name the change names.
        name: String,
        /// The app now.
        now: Option<AppRecord>,
    },
    /// A key, by hash.
    Key {
        /// The hash the change names.
        hash: KeyHash,
        /// The key now.
        now: Option<StoredKey>,
    },
    /// A Stripe customer's subscriptions.
    Customer {
        /// `cus_…`.
        id: String,
        /// Every subscription of the customer now.
        now: Vec<PaidSubscription>,
    },
}

/// The changes after a cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// The entities changed after the cursor, in sequence order, and the cursor to read from next.
    Since {
        /// Changed entities.
        changed: Vec<Changed>,
        /// The sequence number read up to (inclusive).
        through: i64,
    },
    /// The cursor is older than the retained changes: reload everything.
    TooOld,
}

/// Everything the store holds that the snapshot needs, as of sequence `seq` (or later).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    /// The sequence number every change up to which the image contains.
    pub seq: i64,
    /// Every developer.
    pub developers: Vec<DeveloperRecord>,
    /// Every app.
    pub apps: Vec<AppRecord>,
    /// Every key.
    pub keys: Vec<StoredKey>,
    /// Every Stripe subscription.
    pub paid: Vec<PaidSubscription>,
}

/// One row of the audit table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditRecord {
    /// The write's sequence number: `?after=` pages by it.
    pub seq: i64,
    /// When, RFC 3339.
    pub at: String,
    /// Who: the caller's token id (`admin:<fingerprint>`) or `anonymous` on an open loopback listener.
    pub actor: String,
    /// What (`key.revoke`, …).
    pub action: String,
    /// On what (`app:weatherapp/key:key_…`).
    pub target: String,
}

/// Which slice of a list to read: the names after `after`, at most `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Names sort after this one (`None`: from the start).
    pub after: Option<String>,
    /// At most this many.
    pub limit: u32,
}

/// A stored answer to a write that carried an `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    /// SHA-256 of the method, path and body of the first request.
    pub request: [u8; 32],
    /// Its HTTP status; [`Remembered::IN_PROGRESS`] while the first request still runs.
    pub status: u16,
    /// Its body, sealed under a key derived from the `Idempotency-Key` (it may hold an API key).
    pub sealed: Vec<u8>,
}

impl Remembered {
    /// The status of a claim whose request has not answered yet.
    pub const IN_PROGRESS: u16 = 0;
}

/// What claiming an `Idempotency-Key` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Nothing was stored (or only a claim abandoned by a request that died): the request may run.
    Claimed,
    /// An answer, or a claim in progress, is stored.
    Taken(Remembered),
}
