//! One snapshot from two sources: the catalog file's entities merged with the state store's into the
//! [`Catalog`] the Check path reads.
//!
//! Two catalogs are kept. `store` holds the store's developers, apps and keys on the current products;
//! `merged` is `store` plus the file's entities, and is what [`CatalogHandle`] serves. A store change edits
//! both (O(log n) each, structural sharing); a file reload rebuilds `merged` from `store` and the new file,
//! re-resolving the store's apps against the new products.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::catalog::metrics::CatalogMetrics;
use crate::catalog::{App, Catalog, CatalogHandle, Developer, Key, Subscription};
use crate::paywall::model::PaidSubscription;
use crate::state::model::{AppRecord, Changed, DeveloperRecord, Image, StoredKey};
use crate::util::sync::lock;

/// Ids of store entities in the merged catalog start here; the file's are its indices, far below.
pub const STORE_IDS: usize = 1 << 48;

/// The merged catalog's id of store row `id`.
fn store_id(id: i64) -> usize {
    STORE_IDS.saturating_add(usize::try_from(id).unwrap_or(0))
}

/// The store row of merged catalog id `id`.
fn row_of(id: usize) -> i64 {
    i64::try_from(id.saturating_sub(STORE_IDS)).unwrap_or(i64::MAX)
}

/// A name the catalog file and the store both define.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?} is also in the state store: an entity lives in one source only")]
pub struct Clash {
    /// developer, app, client_id or key.
    pub kind: &'static str,
    /// The clashing name (a key's hash is not shown).
    pub name: String,
}

struct Inner {
    /// The catalog file as last installed.
    file: Arc<Catalog>,
    /// The store's entities on the file's products.
    store: Catalog,
    /// The store's apps as stored (by product name), for re-resolution when the products change.
    apps: HashMap<i64, Arc<AppRecord>>,
}

/// Keeps the served catalog equal to the file's entities plus the store's.
pub struct Snapshot {
    handle: Arc<CatalogHandle>,
    inner: Mutex<Inner>,
    /// `catalog_keys` and `catalog_apps` follow the merged catalog.
    metrics: Option<CatalogMetrics>,
}

impl Snapshot {
    /// A snapshot serving through `handle`, with an empty file and store until they are installed.
    pub fn new(handle: Arc<CatalogHandle>, metrics: Option<CatalogMetrics>) -> Snapshot {
        Snapshot {
            handle,
            metrics,
            inner: Mutex::new(Inner {
                file: Arc::new(Catalog::default()),
                store: Catalog::default(),
                apps: HashMap::new(),
            }),
        }
    }

    /// The served catalog.
    pub fn handle(&self) -> &Arc<CatalogHandle> {
        &self.handle
    }

    /// The catalog file's part: what the API must not redefine.
    pub fn file(&self) -> Arc<Catalog> {
        Arc::clone(&lock(&self.inner).file)
    }

    /// Installs a new catalog file, unless it defines a name the store holds.
    pub fn install_file(&self, file: Catalog) -> Result<(), Clash> {
        let mut inner = lock(&self.inner);
        clashes(&file, &inner.store)?;
        // Developers and keys do not name products: they are shared as they are; apps are re-resolved.
        let mut store = inner.store.clone();
        store.set_products_from(&file);
        for app in inner.apps.values() {
            let id = store_id(app.id);
            let products = subscriptions(app, &file);
            // Most reloads leave an app's products where they were: re-inserting it anyway rebuilt three
            // persistent maps per reload (100,000 entries each at a million keys: ~175 MB held while both
            // snapshots live).
            if store.app(id).is_some_and(|now| now.products == products) {
                continue;
            }
            store.put_app(id, Arc::new(app_of(app, products)));
        }
        inner.store = store;
        inner.file = Arc::new(file);
        self.publish(&inner);
        Ok(())
    }

    /// Replaces the store's part with a full image. The image is taken whole so its rows move into the
    /// snapshot rather than being copied beside it, and each part is freed once read: at a million keys
    /// that is what bounds a replica's memory at start.
    pub fn load(&self, image: Image) {
        let Image {
            developers,
            apps: app_rows,
            keys,
            paid,
            ..
        } = image;
        let mut inner = lock(&self.inner);
        let mut store = inner.file.products_only();
        for d in &developers {
            store.put_developer(store_id(d.id), developer(d));
        }
        drop(developers);
        let mut apps = HashMap::with_capacity(app_rows.len());
        for mut a in app_rows {
            store.put_app(store_id(a.id), Arc::new(resolve(&a, &inner.file)));
            // Grown a row at a time by the read: kept for good, so at its size.
            a.products.shrink_to_fit();
            apps.insert(a.id, Arc::new(a));
        }
        store.put_keys(keys.into_iter().map(|k| key(&k)));
        let mut customers: HashMap<String, Vec<PaidSubscription>> = HashMap::new();
        for p in paid {
            customers
                .entry(p.state.customer.clone())
                .or_default()
                .push(p);
        }
        for (customer, subscriptions) in customers {
            store.put_customer(&customer, subscriptions);
        }
        inner.store = store;
        inner.apps = apps;
        self.publish(&inner);
    }

    /// Applies changed entities, as they are now, to both catalogs and serves the result.
    pub fn apply(&self, changed: &[Changed]) {
        if changed.is_empty() {
            return;
        }
        let mut inner = lock(&self.inner);
        let mut merged = (*self.handle.snapshot()).clone();
        for change in changed {
            let Inner { file, store, apps } = &mut *inner;
            if shadowed(change, file) {
                // The file defined it first; the store's copy stays out of the snapshot.
                tracing::warn!(?change, "state store entity shadowed by the catalog file");
                continue;
            }
            if let Changed::App { name, now } = change {
                if let Some(old) = store.app_id(name) {
                    apps.remove(&row_of(old));
                }
                if let Some(app) = now {
                    apps.insert(app.id, Arc::new(app.clone()));
                }
            }
            for catalog in [&mut *store, &mut merged] {
                apply_one(catalog, change, file);
            }
        }
        self.serve(merged);
    }

    fn publish(&self, inner: &Inner) {
        let mut merged = inner.store.clone();
        merged.absorb(&inner.file);
        self.serve(merged);
    }

    fn serve(&self, merged: Catalog) {
        if let Some(m) = &self.metrics {
            m.keys
                .set(i64::try_from(merged.key_count()).unwrap_or(i64::MAX));
            m.apps
                .set(i64::try_from(merged.app_count()).unwrap_or(i64::MAX));
        }
        self.handle.replace(merged);
    }
}

/// Whether a store entity would replace one of the file's.
fn shadowed(change: &Changed, file: &Catalog) -> bool {
    match change {
        Changed::Developer { email, .. } => file.developer_id(email).is_some(),
        Changed::App { name, now } => {
            file.app_id(name).is_some()
                || now
                    .as_ref()
                    .and_then(|a| a.client_id.as_deref())
                    .is_some_and(|c| file.app_by_client_id(c).is_some())
        }
        Changed::Key { hash, .. } => file.key(hash).is_some(),
        // Subscriptions come only from the store.
        Changed::Customer { .. } => false,
    }
}

fn apply_one(catalog: &mut Catalog, change: &Changed, file: &Catalog) {
    match change {
        Changed::Developer { email, now } => match now {
            Some(d) => catalog.put_developer(store_id(d.id), developer(d)),
            None => {
                if let Some(id) = catalog.developer_id(email) {
                    catalog.remove_developer(id);
                }
            }
        },
        Changed::App { name, now } => {
            if let Some(id) = catalog.app_id(name) {
                catalog.remove_app(id);
            }
            if let Some(a) = now {
                catalog.put_app(store_id(a.id), Arc::new(resolve(a, file)));
            }
        }
        Changed::Key { hash, now } => match now {
            Some(k) => catalog.put_key(key(k)),
            None => catalog.remove_key(hash),
        },
        Changed::Customer { id, now } => catalog.put_customer(id, now.clone()),
    }
}

/// The first name `file` defines that `store` holds too.
fn clashes(file: &Catalog, store: &Catalog) -> Result<(), Clash> {
    for d in file.developers() {
        if store.developer_id(&d.email).is_some() {
            return Err(Clash {
                kind: "developer",
                name: d.email.clone(),
            });
        }
    }
    for (_, app) in file.apps() {
        if store.app_id(&app.name).is_some() {
            return Err(Clash {
                kind: "app",
                name: app.name.clone(),
            });
        }
        if let Some(client_id) = &app.client_id
            && store.app_by_client_id(client_id).is_some()
        {
            return Err(Clash {
                kind: "client_id",
                name: client_id.clone(),
            });
        }
    }
    for k in file.keys() {
        if store.key(&k.hash).is_some() {
            return Err(Clash {
                kind: "key",
                name: "(a key hash)".to_owned(),
            });
        }
    }
    Ok(())
}

fn developer(d: &DeveloperRecord) -> Arc<Developer> {
    Arc::new(Developer {
        email: d.email.clone(),
        company: d.company.clone().filter(|c| !c.is_empty()),
        stripe_customer: d.stripe_customer.clone().filter(|c| !c.is_empty()),
    })
}

fn key(k: &StoredKey) -> Key {
    Key {
        hash: k.hash,
        app: store_id(k.app_id),
        status: k.status,
        expires_at: k.expires_at,
    }
}

/// A stored app on `file`'s products; a subscription to a product the file no longer has is dropped (the
/// app keeps the rest, and the API shows the subscription as stored).
fn resolve(a: &AppRecord, file: &Catalog) -> App {
    app_of(a, subscriptions(a, file))
}

/// A stored app's subscriptions, resolved against the file's products (those it no longer has are dropped).
fn subscriptions(a: &AppRecord, file: &Catalog) -> Vec<Subscription> {
    a.products
        .iter()
        .filter_map(|s| {
            let product = file.product_id(&s.product);
            if product.is_none() {
                tracing::warn!(app = %a.name, product = %s.product, "app subscribes to a product the catalog no longer has");
            }
            product.map(|product| Subscription {
                product,
                status: s.status,
            })
        })
        .collect()
}

/// The catalog app of a stored one, with its resolved `products`.
fn app_of(a: &AppRecord, products: Vec<Subscription>) -> App {
    App {
        name: a.name.clone(),
        developer: store_id(a.developer_id),
        status: a.status,
        client_id: a.client_id.clone(),
        products,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Status, SubscriptionStatus};
    use crate::identity::api_key::KeyHash;
    use crate::source::Source;
    use crate::state::model::SubscriptionRecord;

    fn file(extra_product: &str, app: &str) -> Catalog {
        let text = format!(
            "products:\n  - {{name: basic, operations: [{{api: a, paths: [/]}}]}}\n{extra_product}\
             developers:\n  - email: file@x\n    apps:\n      - name: {app}\n        client_id: {app}-client\n\
             \x20       products: [{{name: basic}}]\n        keys: [{{hash: \"{}\"}}]\n",
            KeyHash::of("file-key")
        );
        crate::catalog::parse(&Source::from_text("catalog.yaml", text)).unwrap()
    }

    fn image() -> Image {
        Image {
            seq: 3,
            developers: vec![DeveloperRecord {
                id: 1,
                email: "store@x".into(),
                company: Some("co".into()),
                stripe_customer: None,
                attributes: Default::default(),
                created_at: 0,
                updated_at: 0,
            }],
            apps: vec![AppRecord {
                id: 2,
                name: "storeapp".into(),
                developer_id: 1,
                developer: "store@x".into(),
                client_id: Some("store-client".into()),
                status: Status::Approved,
                products: vec![
                    SubscriptionRecord {
                        product: "premium".into(),
                        status: SubscriptionStatus::Approved,
                    },
                    SubscriptionRecord {
                        product: "basic".into(),
                        status: SubscriptionStatus::Pending,
                    },
                ],
                attributes: Default::default(),
                created_at: 0,
                updated_at: 0,
            }],
            keys: vec![StoredKey {
                hash: KeyHash::of("store-key"),
                app_id: 2,
                status: Status::Approved,
                expires_at: None,
            }],
            paid: Vec::new(),
        }
    }

    fn names(c: &Catalog, app: &str) -> Vec<String> {
        c.app_by_name(app)
            .map(|a| {
                a.products
                    .iter()
                    .map(|s| c.product(s.product).unwrap().name.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn both_sources_merge_and_a_file_reload_re_resolves_the_store_apps() {
        let snapshot = Snapshot::new(Arc::new(CatalogHandle::new(Catalog::default())), None);
        snapshot.install_file(file("", "fileapp")).unwrap();
        snapshot.load(image());
        let c = snapshot.handle().snapshot();
        let key = c.key(&KeyHash::of("store-key")).unwrap();
        let app = c.app(key.app).unwrap();
        assert_eq!(app.name, "storeapp");
        assert_eq!(c.developer(app.developer).unwrap().email, "store@x");
        assert_eq!(
            names(&c, "storeapp"),
            ["basic"],
            "premium is not in the file yet"
        );
        assert!(c.key(&KeyHash::of("file-key")).is_some());
        assert_eq!(c.app_by_client_id("store-client"), c.app_id("storeapp"));

        // A new file with `premium` first: the store app now has both, in its own order.
        let premium = "  - {name: premium, operations: [{api: a, paths: [/p]}]}\n";
        snapshot.install_file(file(premium, "fileapp")).unwrap();
        let c = snapshot.handle().snapshot();
        assert_eq!(names(&c, "storeapp"), ["premium", "basic"]);
        assert!(c.key(&KeyHash::of("store-key")).is_some());

        // A file whose products did not move (its own app renamed): the store app is shared, not rebuilt.
        snapshot.install_file(file(premium, "renamed")).unwrap();
        let again = snapshot.handle().snapshot();
        let id = again.app_id("storeapp").unwrap();
        assert!(std::ptr::eq(c.app(id).unwrap(), again.app(id).unwrap()));
        assert_eq!(names(&again, "storeapp"), ["premium", "basic"]);
        assert!(again.app_id("renamed").is_some() && again.app_id("fileapp").is_none());
    }

    #[test]
    fn a_change_edits_the_snapshot_and_a_clash_is_refused() {
        let snapshot = Snapshot::new(Arc::new(CatalogHandle::new(Catalog::default())), None);
        snapshot.install_file(file("", "fileapp")).unwrap();
        snapshot.load(image());
        let hash = KeyHash::of("store-key");
        let revoked = StoredKey {
            status: Status::Revoked,
            ..image().keys[0]
        };
        let before = snapshot.handle().snapshot();
        snapshot.apply(&[Changed::Key {
            hash,
            now: Some(revoked),
        }]);
        let after = snapshot.handle().snapshot();
        assert_eq!(after.key(&hash).unwrap().status, Status::Revoked);
        assert_eq!(
            before.key(&hash).unwrap().status,
            Status::Approved,
            "a snapshot a Check holds does not change under it"
        );
        snapshot.apply(&[
            Changed::App {
                name: "storeapp".into(),
                now: None,
            },
            Changed::Key { hash, now: None },
        ]);
        let c = snapshot.handle().snapshot();
        assert!(c.app_by_name("storeapp").is_none());
        assert!(c.app_by_client_id("store-client").is_none());
        assert!(c.key(&hash).is_none());
        assert!(
            c.app_by_name("fileapp").is_some(),
            "the file's entities stay"
        );

        // A store entity named like a file one stays out of the snapshot; a file naming a store one is
        // refused.
        snapshot.load(image());
        let clash = snapshot.install_file(file("", "storeapp"));
        assert_eq!(clash.unwrap_err().kind, "app");
        assert_eq!(
            snapshot
                .file()
                .app_by_name("fileapp")
                .map(|a| a.name.clone()),
            Some("fileapp".into())
        );
    }
}
