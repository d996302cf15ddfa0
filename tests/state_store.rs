//! The state store suite: every case runs against the embedded SQLite store and against a real PostgreSQL
//! server that the test starts itself (initdb + pg_ctl on a free loopback port, stopped by PID).

#[path = "support/postgres.rs"]
mod pg;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use tollgate::catalog::{Status, SubscriptionStatus};
use tollgate::credits::CreditLedger;
use tollgate::credits::ledger::{
    Balance, GrantInput, Granted, LeaseAnswer, LeaseCall, Refill, Settled,
};
use tollgate::identity::api_key::KeyHash;
use tollgate::paywall::model::{
    Observation, PaidStatus, PriceItem, StripeEvent, SubscriptionState,
};
use tollgate::state::StateStore;
use tollgate::state::model::{
    AppInput, Changed, Changes, Claim, DeveloperInput, NewKey, Page, Remembered,
    SubscriptionRecord, Write, Written,
};
use tollgate::state::sql::SqlStore;
use tollgate::state::store::{Actor, StoreError};

/// 2026-11-18T…Z: stores take time from the caller.
const T0: i64 = 1_795_000_000;

/// A fresh, migrated database of one backend, and what keeps it alive.
struct Db {
    url: String,
    _keep: Box<dyn std::any::Any>,
}

impl Db {
    fn sqlite() -> Db {
        let dir = TempDir::new().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        Db {
            url,
            _keep: Box::new(dir),
        }
    }

    fn postgres() -> Db {
        let server = pg::PostgresServer::start();
        Db {
            url: server.url(),
            _keep: Box::new(server),
        }
    }

    async fn store(&self) -> SqlStore {
        let store = SqlStore::open(&self.url).expect("open");
        store.migrate().await.expect("migrate");
        store
    }
}

/// Runs `case` once per backend (the macro below makes a test of each).
async fn on<F, Fut>(db: Db, case: F)
where
    F: FnOnce(Db) -> Fut,
    Fut: Future<Output = ()>,
{
    case(db).await;
}

macro_rules! both {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::on(super::Db::sqlite(), super::$case).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::on(super::Db::postgres(), super::$case).await;
                }
            )*
        }
    };
}

both!(
    developers_are_created_replaced_listed_and_deleted,
    apps_keep_their_developer_and_their_client_id,
    subscriptions_are_set_and_added_in_order,
    keys_are_created_rotated_and_revoked,
    changes_name_each_entity_as_it_is_now,
    a_cursor_older_than_the_retained_changes_reloads,
    concurrent_writers_on_two_pools_lose_no_change,
    audit_rows_record_every_write,
    idempotent_answers_are_kept_once,
    only_key_hashes_are_stored,
    migrate_twice_is_harmless,
    stripe_events_are_recorded_once_and_applied_in_any_order,
    stripe_subscriptions_reach_replicas_through_changes_and_loads,
    replicas_take_turns_at_the_resync,
    grants_apply_once_per_source_and_never_take_below_zero,
    leases_count_served_credits_once_and_keep_at_most_what_is_held,
    two_replicas_lease_exactly_what_was_granted,
    concurrent_lease_calls_never_overspend,
    refills_top_up_once_per_period,
    low_balance_is_crossed_once_until_lifted,
    recover_keeps_a_dead_replicas_lease_as_spent,
    recover_with_a_journal_spends_only_what_was_served,
    recover_waits_for_a_concurrent_writer,
    replicas_recovering_at_once_do_not_deadlock,
    reap_settles_only_leases_idle_past_the_bound,
    balances_list_low_accounts_in_owner_order,
    history_batches_are_added_once,
    history_batches_into_the_same_hour_add_up,
    history_replicas_racing_add_every_batch_once,
    history_hours_filter_by_subject_and_range_in_order,
    history_prune_drops_old_hours_and_batch_marks,
    history_sums_add_hours_into_their_buckets,
);

fn actor() -> Actor {
    Actor("admin:test".to_owned())
}

fn developer(email: &str) -> Write {
    Write::PutDeveloper(DeveloperInput {
        email: email.to_owned(),
        company: Some("acme".to_owned()),
        stripe_customer: Some("cus_1".to_owned()),
        attributes: BTreeMap::from([("tier".to_owned(), "gold".to_owned())]),
    })
}

fn app(name: &str, developer: &str, client_id: Option<&str>) -> Write {
    Write::PutApp(AppInput {
        name: name.to_owned(),
        developer: developer.to_owned(),
        client_id: client_id.map(str::to_owned),
        status: Status::Approved,
        products: vec![SubscriptionRecord {
            product: "basic".to_owned(),
            status: SubscriptionStatus::Approved,
        }],
        attributes: BTreeMap::new(),
    })
}

fn new_key(id: &str, secret: &str) -> NewKey {
    NewKey {
        id: id.to_owned(),
        hash: KeyHash::of(secret),
        prefix: secret.chars().take(12).collect(),
        name: None,
        expires_at: None,
    }
}

fn page(after: Option<&str>, limit: u32) -> Page {
    Page {
        after: after.map(str::to_owned),
        limit,
    }
}

async fn write(store: &SqlStore, w: Write) -> Written {
    store.write(&w, &actor(), T0).await.expect("write")
}

async fn developers_are_created_replaced_listed_and_deleted(db: Db) {
    let store = db.store().await;
    for email in ["b@x.example", "a@x.example", "c@x.example"] {
        match write(&store, developer(email)).await {
            Written::Developer { created, record } => {
                assert!(created);
                assert_eq!(record.email, email);
            }
            other => panic!("{other:?}"),
        }
    }
    let replaced = Write::PutDeveloper(DeveloperInput {
        email: "a@x.example".to_owned(),
        company: None,
        stripe_customer: Some("cus_2".to_owned()),
        attributes: BTreeMap::new(),
    });
    let Written::Developer { created, record } =
        store.write(&replaced, &actor(), T0 + 5).await.unwrap()
    else {
        panic!("not a developer")
    };
    assert!(!created);
    assert_eq!((record.created_at, record.updated_at), (T0, T0 + 5));
    let a = store.developer("a@x.example").await.unwrap().unwrap();
    assert_eq!(a.company, None);
    assert_eq!(a.stripe_customer.as_deref(), Some("cus_2"));
    assert!(a.attributes.is_empty());

    let first = store.developers(&page(None, 2)).await.unwrap();
    let emails: Vec<_> = first.iter().map(|d| d.email.as_str()).collect();
    assert_eq!(emails, ["a@x.example", "b@x.example"]);
    let rest = store
        .developers(&page(Some("b@x.example"), 2))
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].email, "c@x.example");

    write(&store, app("app1", "a@x.example", None)).await;
    write(
        &store,
        Write::CreateKey {
            app: "app1".to_owned(),
            key: new_key("key_1", "tg_test_secret1"),
        },
    )
    .await;
    write(
        &store,
        Write::DeleteDeveloper {
            email: "a@x.example".to_owned(),
        },
    )
    .await;
    assert!(store.developer("a@x.example").await.unwrap().is_none());
    assert!(
        store.app("app1").await.unwrap().is_none(),
        "apps go with their developer"
    );
    let image = store.load().await.unwrap();
    assert!(image.keys.is_empty(), "keys go with their app");
    let missing = store
        .write(
            &Write::DeleteDeveloper {
                email: "a@x.example".to_owned(),
            },
            &actor(),
            T0,
        )
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
}

async fn apps_keep_their_developer_and_their_client_id(db: Db) {
    let store = db.store().await;
    write(&store, developer("a@x.example")).await;
    write(&store, developer("b@x.example")).await;
    let orphan = store
        .write(&app("app1", "nobody@x.example", None), &actor(), T0)
        .await;
    assert!(matches!(orphan, Err(StoreError::NotFound(m)) if m.starts_with("developer:")));

    write(&store, app("app1", "a@x.example", Some("client-1"))).await;
    let taken = store
        .write(&app("app2", "a@x.example", Some("client-1")), &actor(), T0)
        .await;
    assert!(matches!(taken, Err(StoreError::Conflict(_))), "{taken:?}");
    let moved = store
        .write(&app("app1", "b@x.example", None), &actor(), T0)
        .await;
    assert!(matches!(moved, Err(StoreError::Conflict(_))), "{moved:?}");

    // Replacing keeps the app's keys.
    write(
        &store,
        Write::CreateKey {
            app: "app1".to_owned(),
            key: new_key("key_1", "tg_test_secret1"),
        },
    )
    .await;
    let Written::App { created, record } = write(&store, app("app1", "a@x.example", None)).await
    else {
        panic!("not an app")
    };
    assert!(!created);
    assert_eq!(record.client_id, None);
    let (stored, keys) = store.app("app1").await.unwrap().unwrap();
    assert_eq!(stored.developer, "a@x.example");
    assert_eq!(keys.len(), 1);

    write(&store, app("app2", "b@x.example", None)).await;
    let of_b = store
        .apps(Some("b@x.example"), &page(None, 10))
        .await
        .unwrap();
    assert_eq!(of_b.len(), 1);
    assert_eq!(of_b[0].name, "app2");
    assert_eq!(of_b[0].products.len(), 1);
    let all = store.apps(None, &page(Some("app1"), 10)).await.unwrap();
    assert_eq!(
        all.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        ["app2"]
    );
}

async fn subscriptions_are_set_and_added_in_order(db: Db) {
    let store = db.store().await;
    write(&store, developer("a@x.example")).await;
    write(&store, app("app1", "a@x.example", None)).await;
    let set = |product: &str, status| Write::SetSubscription {
        app: "app1".to_owned(),
        product: product.to_owned(),
        status,
    };
    write(&store, set("premium", SubscriptionStatus::Pending)).await;
    let Written::App { record, .. } =
        write(&store, set("basic", SubscriptionStatus::Revoked)).await
    else {
        panic!("not an app")
    };
    let got: Vec<_> = record
        .products
        .iter()
        .map(|s| (s.product.as_str(), s.status))
        .collect();
    assert_eq!(
        got,
        [
            ("basic", SubscriptionStatus::Revoked),
            ("premium", SubscriptionStatus::Pending)
        ]
    );
    let missing = store
        .write(
            &Write::SetSubscription {
                app: "nope".to_owned(),
                product: "basic".to_owned(),
                status: SubscriptionStatus::Approved,
            },
            &actor(),
            T0,
        )
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))));
}

async fn keys_are_created_rotated_and_revoked(db: Db) {
    let store = db.store().await;
    write(&store, developer("a@x.example")).await;
    write(&store, app("app1", "a@x.example", None)).await;
    let Written::Key(created) = write(
        &store,
        Write::CreateKey {
            app: "app1".to_owned(),
            key: NewKey {
                expires_at: Some(T0 + 10_000),
                ..new_key("key_1", "tg_test_one")
            },
        },
    )
    .await
    else {
        panic!("not a key")
    };
    assert_eq!(created.status, Status::Approved);
    // The old key expires at the rotation's grace, or sooner when it already expired sooner.
    let Written::Key(rotated) = write(
        &store,
        Write::RotateKey {
            app: "app1".to_owned(),
            old: "key_1".to_owned(),
            old_expires_at: T0 + 20_000,
            key: new_key("key_2", "tg_test_two"),
        },
    )
    .await
    else {
        panic!("not a key")
    };
    assert_eq!(rotated.id, "key_2");
    let (_, keys) = store.app("app1").await.unwrap().unwrap();
    let one = keys.iter().find(|k| k.id == "key_1").unwrap();
    assert_eq!(one.expires_at, Some(T0 + 10_000));
    write(
        &store,
        Write::RotateKey {
            app: "app1".to_owned(),
            old: "key_2".to_owned(),
            old_expires_at: T0 + 60,
            key: new_key("key_3", "tg_test_three"),
        },
    )
    .await;
    let Written::Key(revoked) = write(
        &store,
        Write::RevokeKey {
            app: "app1".to_owned(),
            id: "key_3".to_owned(),
        },
    )
    .await
    else {
        panic!("not a key")
    };
    assert_eq!(revoked.status, Status::Revoked);
    let (_, keys) = store.app("app1").await.unwrap().unwrap();
    let by_id: BTreeMap<_, _> = keys.iter().map(|k| (k.id.as_str(), k)).collect();
    assert_eq!(by_id["key_2"].expires_at, Some(T0 + 60));
    assert_eq!(by_id["key_3"].status, Status::Revoked);
    let again = store
        .write(
            &Write::RotateKey {
                app: "app1".to_owned(),
                old: "key_3".to_owned(),
                old_expires_at: T0,
                key: new_key("key_4", "tg_test_four"),
            },
            &actor(),
            T0,
        )
        .await;
    assert!(
        matches!(again, Err(StoreError::Conflict(_))),
        "a revoked key is not rotated"
    );
    let elsewhere = store
        .write(
            &Write::RevokeKey {
                app: "app2".to_owned(),
                id: "key_1".to_owned(),
            },
            &actor(),
            T0,
        )
        .await;
    assert!(matches!(elsewhere, Err(StoreError::NotFound(_))));
    let duplicate = store
        .write(
            &Write::CreateKey {
                app: "app1".to_owned(),
                key: new_key("key_5", "tg_test_one"),
            },
            &actor(),
            T0,
        )
        .await;
    assert!(
        matches!(duplicate, Err(StoreError::Conflict(_))),
        "{duplicate:?}"
    );
}

async fn changes_name_each_entity_as_it_is_now(db: Db) {
    let store = db.store().await;
    write(&store, developer("a@x.example")).await;
    write(&store, app("app1", "a@x.example", None)).await;
    let hash = KeyHash::of("tg_test_one");
    write(
        &store,
        Write::CreateKey {
            app: "app1".to_owned(),
            key: new_key("key_1", "tg_test_one"),
        },
    )
    .await;
    let Changes::Since { changed, through } = store.changes(0, 1000).await.unwrap() else {
        panic!("too old")
    };
    assert_eq!(through, 3);
    assert_eq!(changed.len(), 3);
    assert!(matches!(
        &changed[0],
        Changed::Developer { now: Some(_), .. }
    ));
    assert!(matches!(&changed[1], Changed::App { now: Some(a), .. } if a.products.len() == 1));
    assert!(matches!(&changed[2], Changed::Key { now: Some(k), .. } if k.hash == hash));

    write(
        &store,
        Write::RevokeKey {
            app: "app1".to_owned(),
            id: "key_1".to_owned(),
        },
    )
    .await;
    // Batches stop at the limit and resume from their end.
    let Changes::Since { changed, through } = store.changes(3, 1).await.unwrap() else {
        panic!("too old")
    };
    assert_eq!(through, 4);
    assert!(
        matches!(&changed[..], [Changed::Key { now: Some(k), .. }] if k.status == Status::Revoked)
    );

    write(
        &store,
        Write::DeleteApp {
            name: "app1".to_owned(),
        },
    )
    .await;
    let Changes::Since { changed, through } = store.changes(4, 1000).await.unwrap() else {
        panic!("too old")
    };
    assert_eq!(through, 5);
    assert!(changed.contains(&Changed::Key { hash, now: None }));
    assert!(changed.contains(&Changed::App {
        name: "app1".to_owned(),
        now: None
    }));
    let Changes::Since { changed, through } = store.changes(5, 1000).await.unwrap() else {
        panic!("too old")
    };
    assert!(changed.is_empty());
    assert_eq!(through, 5);

    // Reading from the start gives each entity once, as it is now.
    let Changes::Since { changed, .. } = store.changes(0, 1000).await.unwrap() else {
        panic!("too old")
    };
    assert_eq!(changed.len(), 3, "{changed:?}");
    let image = store.load().await.unwrap();
    assert_eq!(image.seq, 5);
    assert_eq!(image.developers.len(), 1);
    assert!(image.apps.is_empty());
}

async fn a_cursor_older_than_the_retained_changes_reloads(db: Db) {
    let store = db.store().await;
    write(&store, developer("a@x.example")).await;
    store
        .write(&developer("b@x.example"), &actor(), T0 + 100)
        .await
        .unwrap();
    store.prune(T0 + 50, T0).await.unwrap();
    assert_eq!(store.changes(0, 1000).await.unwrap(), Changes::TooOld);
    let Changes::Since { changed, .. } = store.changes(1, 1000).await.unwrap() else {
        panic!("a cursor at the pruned end is still good")
    };
    assert_eq!(changed.len(), 1);
    let image = store.load().await.unwrap();
    assert_eq!((image.seq, image.developers.len()), (2, 2));
}

async fn concurrent_writers_on_two_pools_lose_no_change(db: Db) {
    // Two pools stand for two replicas. Each writer creates keys while a reader follows the change feed
    // from its cursor: every key must reach the reader, whichever pool wrote it and in whatever order the
    // transactions ran.
    let a = Arc::new(db.store().await);
    let b = Arc::new(SqlStore::open(&db.url).unwrap());
    write(&a, developer("a@x.example")).await;
    write(&a, app("app1", "a@x.example", None)).await;
    const PER_WRITER: usize = 40;
    let mut writers = Vec::new();
    for (w, store) in [
        (0, Arc::clone(&a)),
        (1, Arc::clone(&b)),
        (2, Arc::clone(&a)),
        (3, Arc::clone(&b)),
    ] {
        writers.push(tokio::spawn(async move {
            for i in 0..PER_WRITER {
                let secret = format!("tg_test_w{w}_{i}");
                let key = new_key(&format!("key_{w}_{i}"), &secret);
                store
                    .write(
                        &Write::CreateKey {
                            app: "app1".to_owned(),
                            key,
                        },
                        &actor(),
                        T0,
                    )
                    .await
                    .expect("concurrent write");
            }
        }));
    }
    let reader = {
        let b = Arc::clone(&b);
        tokio::spawn(async move {
            let mut cursor = 0;
            let mut seen = std::collections::HashSet::new();
            while seen.len() < 4 * PER_WRITER {
                let Changes::Since { changed, through } = b.changes(cursor, 7).await.unwrap()
                else {
                    panic!("too old")
                };
                assert!(through >= cursor);
                cursor = through;
                for c in changed {
                    if let Changed::Key { hash, now: Some(_) } = c {
                        seen.insert(hash);
                    }
                }
                tokio::task::yield_now().await;
            }
            cursor
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    let cursor = tokio::time::timeout(std::time::Duration::from_secs(60), reader)
        .await
        .expect("the reader saw every key")
        .unwrap();
    assert!(cursor <= 2 + 4 * PER_WRITER as i64);
    assert_eq!(a.load().await.unwrap().keys.len(), 4 * PER_WRITER);
}

async fn audit_rows_record_every_write(db: Db) {
    let store = db.store().await;
    write(&store, developer("a@x.example")).await;
    write(&store, app("app1", "a@x.example", None)).await;
    let failed = store
        .write(&app("app2", "nobody@x.example", None), &actor(), T0)
        .await;
    assert!(failed.is_err());
    let rows = store.audit(0, 10).await.unwrap();
    let got: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.seq,
                r.action.as_str(),
                r.target.as_str(),
                r.actor.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (1, "developer.put", "developer:a@x.example", "admin:test"),
            (2, "app.put", "app:app1", "admin:test")
        ],
        "a failed write leaves no row and takes no number"
    );
    assert_eq!(rows[0].at, "2026-11-18T11:06:40Z");
    assert_eq!(store.audit(1, 10).await.unwrap().len(), 1);
}

async fn idempotent_answers_are_kept_once(db: Db) {
    let store = db.store().await;
    let (key, request) = ([7u8; 32], [1u8; 32]);
    assert_eq!(
        store.claim(&key, &request, T0, T0 - 60).await.unwrap(),
        Claim::Claimed
    );
    // A second claim while the first runs finds it in progress, whatever its request.
    for other in [request, [2u8; 32]] {
        let Claim::Taken(running) = store.claim(&key, &other, T0 + 1, T0 - 59).await.unwrap()
        else {
            panic!("claimed twice")
        };
        assert_eq!(running.status, Remembered::IN_PROGRESS);
        assert_eq!(running.request, request);
    }
    let answer = Remembered {
        request,
        status: 201,
        sealed: vec![1, 2, 3],
    };
    store.settle(&key, Some(&answer)).await.unwrap();
    assert_eq!(
        store.claim(&key, &request, T0 + 2, T0 - 58).await.unwrap(),
        Claim::Taken(answer.clone())
    );
    // An answer never goes stale; a dropped claim frees the key; an abandoned claim is taken over.
    assert_eq!(
        store
            .claim(&key, &request, T0 + 500, T0 + 400)
            .await
            .unwrap(),
        Claim::Taken(answer)
    );
    let dropped = [8u8; 32];
    assert_eq!(
        store.claim(&dropped, &request, T0, T0 - 60).await.unwrap(),
        Claim::Claimed
    );
    store.settle(&dropped, None).await.unwrap();
    assert_eq!(
        store.claim(&dropped, &request, T0, T0 - 60).await.unwrap(),
        Claim::Claimed
    );
    assert_eq!(
        store
            .claim(&dropped, &[3u8; 32], T0 + 100, T0 + 40)
            .await
            .unwrap(),
        Claim::Claimed,
        "a claim older than the stale bound belongs to a request that died"
    );
    store.prune(0, T0 + 1_000).await.unwrap();
    assert_eq!(
        store.claim(&key, &[4u8; 32], T0 + 1_000, T0).await.unwrap(),
        Claim::Claimed,
        "old answers are pruned"
    );
}

async fn only_key_hashes_are_stored(db: Db) {
    let store = db.store().await;
    write(&store, developer("a@x.example")).await;
    write(&store, app("app1", "a@x.example", None)).await;
    let secret = "tg_live_ThisSecretMustNeverBeStored1234567890";
    write(
        &store,
        Write::CreateKey {
            app: "app1".to_owned(),
            key: new_key("key_1", secret),
        },
    )
    .await;
    let image = store.load().await.unwrap();
    assert_eq!(image.keys[0].hash, KeyHash::of(secret));
    store.close().await;
    let dump = match db.url.strip_prefix("sqlite://") {
        Some(path) => {
            let mut bytes = std::fs::read(path).unwrap_or_default();
            bytes.extend(std::fs::read(format!("{path}-wal")).unwrap_or_default());
            String::from_utf8_lossy(&bytes).into_owned()
        }
        None => {
            let server = db
                ._keep
                .downcast_ref::<pg::PostgresServer>()
                .expect("the postgres server");
            server.psql("SELECT row_to_json(k)::text FROM api_keys k")
        }
    };
    assert!(
        dump.contains(&KeyHash::of(secret).to_string()),
        "the hash is there"
    );
    assert!(
        !dump.contains(&secret[12..]),
        "the key's secret part is not"
    );
}

async fn migrate_twice_is_harmless(db: Db) {
    let store = db.store().await;
    write(&store, developer("a@x.example")).await;
    store.migrate().await.unwrap();
    let again = SqlStore::open(&db.url).unwrap();
    again.migrate().await.unwrap();
    assert!(again.developer("a@x.example").await.unwrap().is_some());
    again.ping().await.unwrap();
}

fn paid_state(id: &str, customer: &str, status: PaidStatus, price: &str) -> SubscriptionState {
    SubscriptionState {
        id: id.into(),
        customer: customer.into(),
        status,
        items: vec![PriceItem {
            price: price.into(),
            lookup_key: None,
        }],
        period_start: Some(T0 - 100),
    }
}

fn stripe_event(id: &str, status: PaidStatus, created: i64) -> StripeEvent {
    StripeEvent {
        id: id.into(),
        kind: "customer.subscription.updated".into(),
        created,
        customer: "cus_1".into(),
        observation: Observation::State {
            state: paid_state("sub_1", "cus_1", status, "price_a"),
            as_of: created,
        },
    }
}

fn observe(event: &StripeEvent) -> Write {
    Write::Observe {
        customer: event.customer.clone(),
        observation: event.observation.clone(),
        source: event.id.clone(),
        event: Some(event.id.clone()),
    }
}

async fn stripe_events_are_recorded_once_and_applied_in_any_order(db: Db) {
    let store = db.store().await;
    let newer = stripe_event("evt_2", PaidStatus::PastDue, T0 + 20);
    let older = stripe_event("evt_1", PaidStatus::Active, T0 + 10);
    assert!(store.record_event(&newer, T0).await.unwrap());
    assert!(
        !store.record_event(&newer, T0 + 1).await.unwrap(),
        "a second delivery is a duplicate"
    );
    assert!(store.record_event(&older, T0 + 2).await.unwrap());
    assert!(
        store
            .claim_events(T0 + 10, T0, 10)
            .await
            .unwrap()
            .is_empty(),
        "received_before is exclusive"
    );
    let pending = store.claim_events(T0 + 10, T0 + 10, 10).await.unwrap();
    assert_eq!(
        pending.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["evt_2", "evt_1"],
        "oldest received first, every field kept"
    );
    assert_eq!(pending[0], newer);
    assert!(
        store
            .claim_events(T0 + 20, T0 + 10, 10)
            .await
            .unwrap()
            .is_empty(),
        "claimed: another replica does not take them within a minute"
    );

    // Delivered out of order: the newer state stays.
    let Written::Paid(Some(due)) = write(&store, observe(&newer)).await else {
        panic!("the first observation is stored")
    };
    assert_eq!(due.past_due_since, Some(T0 - 100));
    assert_eq!(write(&store, observe(&older)).await, Written::Paid(None));
    let now = store.paid_subscriptions("cus_1").await.unwrap();
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].state.status, PaidStatus::PastDue);
    assert_eq!(now[0].source, "evt_2");
    assert!(
        store
            .claim_events(T0 + 100, T0 + 100, 10)
            .await
            .unwrap()
            .is_empty(),
        "both events are applied, the older one with no change"
    );
    // An invoice of an unknown subscription changes nothing; a paid invoice heals a known one.
    let invoice = |sub: &str, paid: bool, as_of: i64| Write::Observe {
        customer: "cus_1".into(),
        observation: Observation::Invoice {
            subscription: sub.into(),
            paid,
            period_end: None,
            as_of,
        },
        source: "evt_inv".into(),
        event: None,
    };
    assert_eq!(
        write(&store, invoice("sub_unknown", true, T0 + 30)).await,
        Written::Paid(None)
    );
    let Written::Paid(Some(healed)) = write(&store, invoice("sub_1", true, T0 + 30)).await else {
        panic!("paid invoice heals")
    };
    assert_eq!(
        (healed.state.status, healed.past_due_since),
        (PaidStatus::Active, None)
    );
    // Applied events are pruned with the changes; pending ones stay.
    let late = stripe_event("evt_3", PaidStatus::Canceled, T0 + 40);
    assert!(store.record_event(&late, T0 + 3).await.unwrap());
    store.prune(T0 + 1_000, T0).await.unwrap();
    let left = store
        .claim_events(T0 + 1_000, T0 + 1_000, 10)
        .await
        .unwrap();
    assert_eq!(
        left.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["evt_3"]
    );
    assert!(
        store.record_event(&newer, T0 + 4).await.unwrap(),
        "a pruned id is new again (Stripe stops retrying after 3 days; events are kept 7)"
    );
}

async fn stripe_subscriptions_reach_replicas_through_changes_and_loads(db: Db) {
    let store = db.store().await;
    let cursor = match store.changes(0, 1000).await.unwrap() {
        Changes::Since { through, .. } => through,
        Changes::TooOld => panic!("fresh store"),
    };
    let seen = |state: SubscriptionState, as_of: i64, source: &str| Write::Observe {
        customer: state.customer.clone(),
        observation: Observation::State { state, as_of },
        source: source.into(),
        event: None,
    };
    for (id, customer, status, price) in [
        ("sub_a", "cus_1", PaidStatus::Active, "price_a"),
        ("sub_b", "cus_1", PaidStatus::Trialing, "price_b"),
        ("sub_c", "cus_2", PaidStatus::Canceled, "price_a"),
    ] {
        write(
            &store,
            seen(paid_state(id, customer, status, price), T0, "resync"),
        )
        .await;
    }
    let Changes::Since { changed, .. } = store.changes(cursor, 1000).await.unwrap() else {
        panic!("since")
    };
    let customers: BTreeMap<String, Vec<String>> = changed
        .into_iter()
        .filter_map(|c| match c {
            Changed::Customer { id, now } => {
                Some((id, now.into_iter().map(|s| s.state.id).collect()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        customers["cus_1"],
        ["sub_a", "sub_b"],
        "the customer as it is now"
    );
    assert_eq!(customers["cus_2"], ["sub_c"]);
    let image = store.load().await.unwrap();
    let mut ids: Vec<&str> = image.paid.iter().map(|s| s.state.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["sub_a", "sub_b", "sub_c"]);
    let audit = store.audit(0, 100).await.unwrap();
    assert!(
        audit.iter().any(|a| a.action == "stripe.observe"
            && a.target == "customer:cus_2/subscription:sub_c from resync"),
        "{audit:?}"
    );
}

async fn replicas_take_turns_at_the_resync(db: Db) {
    let one = db.store().await;
    let two = SqlStore::open(&db.url).expect("second pool");
    assert!(
        one.claim_resync(T0, 3600).await.unwrap(),
        "the first turn is free"
    );
    assert!(
        !two.claim_resync(T0 + 10, 3600).await.unwrap(),
        "taken within the interval"
    );
    assert!(two.claim_resync(T0 + 3600, 3600).await.unwrap());
    assert!(!one.claim_resync(T0 + 3601, 3600).await.unwrap());
}

/// Grants `amount` to `owner` from `source` (the reason names the source, so listings show which is which).
async fn grant(store: &SqlStore, owner: &str, amount: i64, source: &str, now: i64) -> Granted {
    let reason = format!("reason for {source}");
    store
        .grant(&GrantInput {
            owner,
            amount,
            reason: &reason,
            source,
            low_balance: 50,
            now,
        })
        .await
        .expect("grant")
}

/// A lease call of `replica` for `owner` that reports, keeps and asks nothing: cases set what they test.
fn call<'a>(owner: &'a str, replica: &'a str) -> LeaseCall<'a> {
    LeaseCall {
        owner,
        replica,
        served_total: 0,
        keep: 0,
        need: 0,
        max_extra: 0,
        refill: None,
        low_balance: 0,
        now: T0,
    }
}

async fn lease(store: &SqlStore, call: &LeaseCall<'_>) -> LeaseAnswer {
    store.lease(call).await.expect("lease")
}

/// `owner`'s (balance, granted, spent, reserved) as the ledger holds them.
async fn numbers(store: &SqlStore, owner: &str) -> (i64, i64, i64, i64) {
    let b = store
        .balance(owner)
        .await
        .expect("balance")
        .unwrap_or_else(|| panic!("no account for {owner}"));
    (b.balance, b.granted, b.spent, b.reserved)
}

/// An answer without a refill nor a low-balance crossing.
fn answer(kept: u64, granted: u64, balance: u64) -> LeaseAnswer {
    LeaseAnswer {
        kept,
        granted,
        balance,
        crossed_low: false,
        refilled: 0,
        conflicted: false,
    }
}

async fn grants_apply_once_per_source_and_never_take_below_zero(db: Db) {
    let store = db.store().await;
    assert_eq!(store.balance("acme").await.unwrap(), None);
    let fresh = Balance {
        owner: "acme".to_owned(),
        balance: 100,
        granted: 100,
        spent: 0,
        reserved: 0,
        updated_at: T0,
    };
    assert_eq!(
        grant(&store, "acme", 100, "api:one", T0).await,
        Granted::New(fresh.clone())
    );
    assert_eq!(
        grant(&store, "acme", 100, "api:one", T0 + 1).await,
        Granted::Duplicate(fresh.clone()),
        "a source is granted once"
    );
    assert_eq!(
        grant(&store, "acme", 500, "api:one", T0 + 1).await,
        Granted::Reused(fresh),
        "a source granted with another amount is refused, not granted again"
    );
    let Granted::New(taken) = grant(&store, "acme", -30, "api:two", T0 + 2).await else {
        panic!("a take-back the balance covers is applied")
    };
    assert_eq!(
        (taken.balance, taken.granted, taken.updated_at),
        (70, 70, T0 + 2)
    );

    // Leased credits count as spent: a take-back only reaches the free balance (70 - 50 = 20).
    let leased = lease(
        &store,
        &LeaseCall {
            need: 50,
            ..call("acme", "r1")
        },
    )
    .await;
    assert_eq!(leased, answer(0, 50, 20));
    let Granted::Insufficient(refused) = grant(&store, "acme", -40, "api:three", T0 + 3).await
    else {
        panic!("a take-back larger than the free balance is refused")
    };
    assert_eq!((refused.balance, refused.reserved), (20, 50));
    assert_eq!(numbers(&store, "acme").await, (20, 70, 0, 50));
    assert!(
        matches!(grant(&store, "acme", -20, "api:four", T0 + 4).await, Granted::New(b) if b.balance == 0),
        "the whole free balance may be taken back"
    );
    assert!(
        matches!(grant(&store, "acme", -30, "api:two", T0 + 5).await, Granted::Duplicate(b) if b.balance == 0),
        "a take-back applied before is a duplicate even where the balance no longer covers it"
    );
    assert_eq!(numbers(&store, "acme").await, (0, 50, 0, 50));

    // A refused source was not recorded: once the lease comes back it applies.
    assert_eq!(lease(&store, &call("acme", "r1")).await, answer(0, 0, 50));
    assert!(matches!(
        grant(&store, "acme", -40, "api:three", T0 + 6).await,
        Granted::New(b) if b.balance == 10
    ));

    let listed = store.grants("acme", 10).await.unwrap();
    let got: Vec<_> = listed
        .iter()
        .map(|g| (g.source.as_str(), g.amount, g.reason.as_str(), g.created_at))
        .collect();
    assert_eq!(
        got,
        [
            ("api:three", -40, "reason for api:three", T0 + 6),
            ("api:four", -20, "reason for api:four", T0 + 4),
            ("api:two", -30, "reason for api:two", T0 + 2),
            ("api:one", 100, "reason for api:one", T0),
        ],
        "newest first, duplicates and refusals left out"
    );
    assert!(listed.windows(2).all(|w| w[0].id > w[1].id));
    let newest = store.grants("acme", 2).await.unwrap();
    assert_eq!(newest, listed[..2]);

    // Sources are unique across owners: a webhook delivered again after its customer moved to another
    // owner grants nothing twice, and writes no account for that owner.
    assert!(matches!(
        grant(&store, "globex", 100, "api:one", T0).await,
        Granted::Duplicate(b) if b.owner == "globex" && b.granted == 0
    ));
    assert_eq!(store.balance("globex").await.unwrap(), None);
    assert!(matches!(
        grant(&store, "globex", 5, "api:globex", T0).await,
        Granted::New(b) if b.balance == 5
    ));
    assert_eq!(store.grants("globex", 10).await.unwrap().len(), 1);
    assert!(store.grants("nobody", 10).await.unwrap().is_empty());
}

async fn leases_count_served_credits_once_and_keep_at_most_what_is_held(db: Db) {
    let store = db.store().await;
    grant(&store, "acme", 100, "api:one", T0).await;
    // 1 needed + min(100, (100 - 1) / 8) extra.
    let first = LeaseCall {
        need: 1,
        max_extra: 100,
        ..call("acme", "r1")
    };
    assert_eq!(lease(&store, &first).await, answer(0, 13, 87));
    assert_eq!(numbers(&store, "acme").await, (87, 100, 0, 13));

    let report = LeaseCall {
        served_total: 5,
        keep: 8,
        ..call("acme", "r1")
    };
    assert_eq!(lease(&store, &report).await, answer(8, 0, 87));
    assert_eq!(numbers(&store, "acme").await, (87, 100, 5, 8));
    assert_eq!(
        lease(&store, &report).await,
        answer(8, 0, 87),
        "a report replayed after a lost answer"
    );
    assert_eq!(
        numbers(&store, "acme").await,
        (87, 100, 5, 8),
        "the same served total counts once"
    );

    let greedy = LeaseCall {
        keep: 50,
        ..report.clone()
    };
    assert_eq!(
        lease(&store, &greedy).await,
        LeaseAnswer {
            conflicted: true,
            ..answer(8, 0, 87)
        },
        "a replica keeps no more than the ledger holds for it, and hears it claimed more"
    );
    assert_eq!(numbers(&store, "acme").await, (87, 100, 5, 8));

    // A call whose answer was lost granted 1; its retry gives that back before leasing again.
    let more = LeaseCall {
        need: 1,
        ..report.clone()
    };
    assert_eq!(lease(&store, &more).await, answer(8, 1, 86));
    assert_eq!(lease(&store, &more).await, answer(8, 1, 86));
    assert_eq!(numbers(&store, "acme").await, (86, 100, 5, 9));

    let too_much = LeaseCall {
        keep: 9,
        need: 87,
        max_extra: 10,
        ..report.clone()
    };
    assert_eq!(
        lease(&store, &too_much).await,
        answer(9, 0, 86),
        "a need beyond the free balance gets nothing"
    );
    assert_eq!(numbers(&store, "acme").await, (86, 100, 5, 9));
    let all = LeaseCall {
        keep: 9,
        need: 86,
        max_extra: 10,
        ..report.clone()
    };
    assert_eq!(
        lease(&store, &all).await,
        answer(9, 86, 0),
        "a need of exactly the free balance fits"
    );

    // Serving 10 more and returning the rest.
    let back = LeaseCall {
        served_total: 15,
        ..call("acme", "r1")
    };
    assert_eq!(lease(&store, &back).await, answer(0, 0, 85));
    assert_eq!(numbers(&store, "acme").await, (85, 100, 15, 0));

    // A replica cannot have served more than it held: a report beyond it spends only the lease.
    let four = LeaseCall {
        need: 4,
        ..back.clone()
    };
    assert_eq!(lease(&store, &four).await, answer(0, 4, 81));
    let beyond = LeaseCall {
        served_total: 25,
        ..call("acme", "r1")
    };
    assert_eq!(
        lease(&store, &beyond).await,
        LeaseAnswer {
            conflicted: true,
            ..answer(0, 0, 81)
        }
    );
    assert_eq!(numbers(&store, "acme").await, (81, 100, 19, 0));
}

async fn two_replicas_lease_exactly_what_was_granted(db: Db) {
    let store = db.store().await;
    grant(&store, "acme", 10, "api:one", T0).await;
    let replicas = ["r1", "r2"];
    let mut held = [0u64; 2];
    let mut rounds = 0;
    loop {
        let mut granted = 0;
        for (replica, held) in replicas.iter().zip(held.iter_mut()) {
            let got = lease(
                &store,
                &LeaseCall {
                    keep: *held,
                    need: 1,
                    ..call("acme", replica)
                },
            )
            .await;
            assert_eq!(got.kept, *held);
            *held += got.granted;
            granted += got.granted;
        }
        if granted == 0 {
            break;
        }
        rounds += 1;
        assert!(rounds <= 10, "more rounds than credits: {held:?}");
    }
    assert_eq!(held, [5, 5], "one credit each in turn, none twice");
    assert_eq!(numbers(&store, "acme").await, (0, 10, 0, 10));
}

async fn concurrent_lease_calls_never_overspend(db: Db) {
    // More tasks than pooled connections (8 on PostgreSQL, 4 on SQLite), each a replica, all on one owner.
    const TASKS: usize = 8;
    const CALLS: usize = 20;
    let store = Arc::new(db.store().await);
    grant(&store, "acme", 50, "api:one", T0).await;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let replica = format!("r{t}");
            let (mut served, mut held, mut got) = (0u64, 0u64, 0u64);
            for _ in 0..CALLS {
                // Serves half of what it holds before each call and keeps the rest, so reports, keeps and
                // grants all race.
                let serve = held.div_ceil(2);
                served += serve;
                held -= serve;
                let answer = lease(
                    &store,
                    &LeaseCall {
                        served_total: served,
                        keep: held,
                        need: 1,
                        max_extra: 2,
                        ..call("acme", &replica)
                    },
                )
                .await;
                assert_eq!(answer.kept, held, "{replica} lost credits it held");
                held += answer.granted;
                got += answer.granted;
            }
            let done = LeaseCall {
                served_total: got,
                ..call("acme", &replica)
            };
            assert_eq!(lease(&store, &done).await.kept, 0);
            got
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("lease task");
    }
    // 160 calls that each need 1 use up all 50 credits, and never one more.
    assert_eq!(total, 50);
    assert_eq!(numbers(&store, "acme").await, (0, 50, 50, 0));
}

async fn refills_top_up_once_per_period(db: Db) {
    let store = db.store().await;
    grant(&store, "acme", 200, "api:one", T0).await;
    let period = T0 - 3_600;
    let refill = Refill {
        product: "free",
        amount: 1_000,
        period_start: period,
    };
    let first = LeaseCall {
        need: 300,
        refill: Some(refill),
        ..call("acme", "r1")
    };
    assert_eq!(
        lease(&store, &first).await,
        LeaseAnswer {
            refilled: 800,
            ..answer(0, 300, 700)
        },
        "topped up to 1000 before leasing"
    );
    assert_eq!(numbers(&store, "acme").await, (700, 1_000, 0, 300));
    let grants = store.grants("acme", 10).await.unwrap();
    assert_eq!(grants.len(), 2);
    assert_eq!(
        (grants[0].source.as_str(), grants[0].amount),
        (format!("refill:acme:free:{period}").as_str(), 800)
    );

    // The same period, from this replica or another: nothing more.
    let report = LeaseCall {
        served_total: 300,
        refill: Some(refill),
        ..call("acme", "r1")
    };
    assert_eq!(lease(&store, &report).await, answer(0, 0, 700));
    let other = LeaseCall {
        refill: Some(refill),
        ..call("acme", "r2")
    };
    assert_eq!(lease(&store, &other).await, answer(0, 0, 700));
    assert_eq!(numbers(&store, "acme").await, (700, 1_000, 300, 0));
    assert_eq!(store.grants("acme", 10).await.unwrap().len(), 2);

    // A new period tops granted - spent up: what r2 holds leased counts as unspent (it comes back unless
    // served).
    let held = LeaseCall {
        need: 100,
        ..call("acme", "r2")
    };
    assert_eq!(lease(&store, &held).await, answer(0, 100, 600));
    let next = T0 + 30 * 86_400;
    let next_period = LeaseCall {
        served_total: 300,
        refill: Some(Refill {
            period_start: next,
            ..refill
        }),
        ..call("acme", "r1")
    };
    assert_eq!(
        lease(&store, &next_period).await,
        LeaseAnswer {
            refilled: 300,
            ..answer(0, 0, 900)
        }
    );
    assert_eq!(numbers(&store, "acme").await, (900, 1_300, 300, 100));
    let newest = &store.grants("acme", 1).await.unwrap()[0];
    assert_eq!(
        (newest.source.as_str(), newest.amount),
        (format!("refill:acme:free:{next}").as_str(), 300)
    );

    // Above the refill's amount a new period adds nothing.
    grant(&store, "acme", 500, "api:two", T0).await;
    let above = LeaseCall {
        served_total: 300,
        refill: Some(Refill {
            period_start: next + 30 * 86_400,
            ..refill
        }),
        ..call("acme", "r1")
    };
    assert_eq!(lease(&store, &above).await, answer(0, 0, 1_400));
    assert_eq!(numbers(&store, "acme").await, (1_400, 1_800, 300, 100));
}

async fn low_balance_is_crossed_once_until_lifted(db: Db) {
    let store = db.store().await;
    grant(&store, "acme", 100, "api:one", T0).await;
    let low = |served_total: u64, keep: u64, need: u64| LeaseCall {
        served_total,
        keep,
        need,
        low_balance: 50,
        ..call("acme", "r1")
    };
    let crossed = |a: LeaseAnswer| (a.balance, a.crossed_low);
    // Leases alone never cross it: they may come back unserved.
    assert_eq!(crossed(lease(&store, &low(0, 0, 60)).await), (40, false));
    assert_eq!(crossed(lease(&store, &low(30, 30, 0)).await), (40, false));
    assert_eq!(
        crossed(lease(&store, &low(55, 5, 0)).await),
        (40, true),
        "the report that takes granted - spent below 50"
    );
    assert_eq!(
        crossed(lease(&store, &low(58, 2, 0)).await),
        (40, false),
        "already below"
    );
    assert_eq!(
        crossed(lease(&store, &low(58, 0, 0)).await),
        (42, false),
        "a returned lease does not lift it"
    );

    // A grant lifts it: the next drop crosses again, and a lease taken meanwhile does not.
    grant(&store, "acme", 100, "api:two", T0).await;
    assert_eq!(crossed(lease(&store, &low(58, 0, 100)).await), (42, false));
    assert_eq!(crossed(lease(&store, &low(153, 5, 0)).await), (42, true));
}

/// A first lease call of `replica` for `owner`, asking exactly `need`, which the balance covers.
async fn first_lease(store: &SqlStore, owner: &str, replica: &str, need: u64) {
    let got = lease(
        store,
        &LeaseCall {
            need,
            ..call(owner, replica)
        },
    )
    .await;
    assert_eq!(got.granted, need, "{replica} leases {need} of {owner}");
}

async fn recover_keeps_a_dead_replicas_lease_as_spent(db: Db) {
    let store = db.store().await;
    grant(&store, "acme", 100, "api:one", T0).await;
    grant(&store, "globex", 100, "api:one-globex", T0).await;
    first_lease(&store, "acme", "r1", 10).await;
    let report = LeaseCall {
        served_total: 3,
        keep: 7,
        ..call("acme", "r1")
    };
    assert_eq!(lease(&store, &report).await.kept, 7);
    first_lease(&store, "globex", "r1", 4).await;
    first_lease(&store, "acme", "r2", 6).await;
    assert_eq!(numbers(&store, "acme").await, (84, 100, 3, 13));

    // Without a journal, any of what r1 held may have been served.
    assert_eq!(
        store.recover("r1", None, T0 + 10).await.unwrap(),
        Settled {
            kept: 7 + 4,
            ..Settled::default()
        }
    );
    assert_eq!(numbers(&store, "acme").await, (84, 100, 10, 6));
    assert_eq!(numbers(&store, "globex").await, (96, 100, 4, 0));
    assert_eq!(
        store.recover("r1", None, T0 + 11).await.unwrap(),
        Settled::default(),
        "nothing left to close"
    );
    assert_eq!(
        lease(
            &store,
            &LeaseCall {
                keep: 6,
                ..call("acme", "r2")
            }
        )
        .await,
        answer(6, 0, 84),
        "another replica's lease stays"
    );

    // r1's next life counts from 0 again: its old lease row (3 reported) is gone.
    let reborn = LeaseCall {
        keep: 5,
        need: 2,
        ..call("acme", "r1")
    };
    assert_eq!(
        lease(&store, &reborn).await,
        LeaseAnswer {
            conflicted: true,
            ..answer(0, 2, 82)
        },
        "nothing of the old lease is kept"
    );
    let served = LeaseCall {
        served_total: 2,
        ..call("acme", "r1")
    };
    assert_eq!(lease(&store, &served).await, answer(0, 0, 82));
    assert_eq!(numbers(&store, "acme").await, (82, 100, 12, 6));
}

async fn reap_settles_only_leases_idle_past_the_bound(db: Db) {
    let store = db.store().await;
    grant(&store, "acme", 100, "api:one", T0).await;
    // r1 died for good at T0; r2 called at T0 + 500.
    first_lease(&store, "acme", "r1", 10).await;
    let late = LeaseCall {
        need: 6,
        now: T0 + 500,
        ..call("acme", "r2")
    };
    assert_eq!(lease(&store, &late).await.granted, 6);
    assert_eq!(
        store.reap(T0 + 100, T0 + 700).await.unwrap(),
        10,
        "only r1's lease is older than the bound"
    );
    assert_eq!(numbers(&store, "acme").await, (84, 100, 10, 6));
    assert_eq!(
        store.reap(T0 + 100, T0 + 701).await.unwrap(),
        0,
        "a settled lease is not settled twice"
    );
    // r2 goes on as before.
    let r2 = LeaseCall {
        served_total: 6,
        now: T0 + 702,
        ..call("acme", "r2")
    };
    assert_eq!(lease(&store, &r2).await, answer(0, 0, 84));
    assert_eq!(numbers(&store, "acme").await, (84, 100, 16, 0));
}

async fn recover_with_a_journal_spends_only_what_was_served(db: Db) {
    let store = db.store().await;
    for owner in ["acme", "globex", "initech"] {
        grant(&store, owner, 100, &format!("api:{owner}"), T0).await;
    }
    first_lease(&store, "acme", "r1", 10).await;
    let report = LeaseCall {
        served_total: 3,
        keep: 7,
        ..call("acme", "r1")
    };
    assert_eq!(lease(&store, &report).await.kept, 7);
    first_lease(&store, "globex", "r1", 4).await;
    first_lease(&store, "initech", "r1", 5).await;
    first_lease(&store, "acme", "r2", 6).await;

    // The journal's totals count from the life's start, like the lease rows' reports: acme served 5 more
    // than the 3 reported; globex claims more than was held (only the lease is spent); initech is not named
    // although it held a lease (its slot was never written: a failed write, or a name too long), so what it
    // held may have been served and stays spent.
    let journal = HashMap::from([("acme".to_owned(), 8), ("globex".to_owned(), 100)]);
    assert_eq!(
        store.recover("r1", Some(&journal), T0 + 10).await.unwrap(),
        Settled {
            served: 5 + 4,
            returned: 2,
            kept: 5,
        }
    );
    assert_eq!(numbers(&store, "acme").await, (86, 100, 8, 6));
    assert_eq!(numbers(&store, "globex").await, (96, 100, 4, 0));
    assert_eq!(numbers(&store, "initech").await, (95, 100, 5, 0));
    assert_eq!(
        store.recover("r1", Some(&journal), T0 + 11).await.unwrap(),
        Settled::default(),
        "a journal read again closes nothing twice"
    );
    assert_eq!(
        lease(
            &store,
            &LeaseCall {
                keep: 6,
                ..call("acme", "r2")
            }
        )
        .await,
        answer(6, 0, 86),
        "another replica's lease stays"
    );
}

async fn recover_waits_for_a_concurrent_writer(db: Db) {
    // A restarted replica recovers while another connection (a state-store write, a grant) holds the lock
    // it needs: recover waits for it like every other ledger write, and keeps that writer's change.
    let store = db.store().await;
    grant(&store, "acme", 100, "api:one", T0).await;
    first_lease(&store, "acme", "r1", 10).await;
    let other = sqlx::AnyPool::connect(&db.url)
        .await
        .expect("another connection");
    let mut writer = other.begin().await.expect("begin");
    sqlx::query("UPDATE credit_balances SET granted = granted + 5 WHERE owner = 'acme'")
        .execute(&mut *writer)
        .await
        .expect("the other write");
    let recovering = {
        let store = store.clone();
        tokio::spawn(async move { store.recover("r1", None, T0 + 1).await })
    };
    // Time for the recovery to reach the lock; it must be waiting there, not have given up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !recovering.is_finished(),
        "recover ended while another writer held the lock: {:?}",
        recovering.await
    );
    writer.commit().await.expect("commit");
    let settled = recovering
        .await
        .expect("recover task")
        .expect("recover after the other write");
    assert_eq!(settled.kept, 10);
    assert_eq!(numbers(&store, "acme").await, (95, 105, 10, 0));
    other.close().await;
}

async fn replicas_recovering_at_once_do_not_deadlock(db: Db) {
    // Two replicas restart together and close leases on the same two owners, taken in opposite orders.
    // Another connection holds both owners until both recoveries wait, so they then run side by side.
    let store = db.store().await;
    grant(&store, "acme", 100, "api:one", T0).await;
    grant(&store, "globex", 100, "api:one-globex", T0).await;
    first_lease(&store, "acme", "r1", 1).await;
    first_lease(&store, "globex", "r1", 2).await;
    first_lease(&store, "globex", "r2", 3).await;
    first_lease(&store, "acme", "r2", 4).await;
    let other = sqlx::AnyPool::connect(&db.url)
        .await
        .expect("another connection");
    let mut writer = other.begin().await.expect("begin");
    sqlx::query("UPDATE credit_balances SET updated_at = $1 WHERE owner IN ('acme', 'globex')")
        .bind(T0 + 1)
        .execute(&mut *writer)
        .await
        .expect("lock both owners");
    let recovering: Vec<_> = ["r1", "r2"]
        .into_iter()
        .map(|replica| {
            let store = store.clone();
            tokio::spawn(async move { store.recover(replica, None, T0 + 2).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    writer.commit().await.expect("commit");
    let mut kept = Vec::new();
    for task in recovering {
        kept.push(
            task.await
                .expect("recover task")
                .expect("recover beside another")
                .kept,
        );
    }
    assert_eq!(kept, [1 + 2, 3 + 4]);
    assert_eq!(numbers(&store, "acme").await, (95, 100, 5, 0));
    assert_eq!(numbers(&store, "globex").await, (95, 100, 5, 0));
    other.close().await;
}

async fn balances_list_low_accounts_in_owner_order(db: Db) {
    let store = db.store().await;
    for (owner, amount) in [
        ("umbrella", 49),
        ("acme", 200),
        ("zeta", 50),
        ("globex", 30),
        ("a@x.example", 10),
        ("initech", 100),
    ] {
        grant(&store, owner, amount, &format!("api:{owner}"), T0).await;
    }
    // A lease alone does not make an account low (it may come back unserved)...
    first_lease(&store, "initech", "r1", 80).await;
    assert!(
        store
            .balances(Some(50), None, 10)
            .await
            .unwrap()
            .iter()
            .all(|b| b.owner != "initech")
    );
    // ...what was reported served does.
    let served = LeaseCall {
        served_total: 80,
        ..call("initech", "r1")
    };
    lease(&store, &served).await;

    let owners = |list: Vec<Balance>| list.into_iter().map(|b| b.owner).collect::<Vec<_>>();
    assert_eq!(
        owners(store.balances(Some(50), None, 10).await.unwrap()),
        ["a@x.example", "globex", "initech", "umbrella"]
    );
    assert_eq!(
        owners(store.balances(Some(50), None, 2).await.unwrap()),
        ["a@x.example", "globex"]
    );
    let rest = store.balances(Some(50), Some("globex"), 2).await.unwrap();
    assert_eq!(
        rest[0],
        Balance {
            owner: "initech".to_owned(),
            balance: 20,
            granted: 100,
            spent: 80,
            reserved: 0,
            updated_at: T0,
        }
    );
    assert_eq!(owners(rest), ["initech", "umbrella"]);
    assert!(
        store
            .balances(Some(50), Some("umbrella"), 2)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        owners(store.balances(None, Some("globex"), 10).await.unwrap()),
        ["initech", "umbrella", "zeta"]
    );
    assert_eq!(store.balances(None, None, 100).await.unwrap().len(), 6);
}

// --- usage history (CONTRACT §10): hourly rollups, added once per batch ---------------------------------

// In a module of their own: `HistoryStore` and `StateStore` both have a `prune`, so the two traits are never
// in scope together.
use history_cases::{
    history_batches_are_added_once, history_batches_into_the_same_hour_add_up,
    history_hours_filter_by_subject_and_range_in_order,
    history_prune_drops_old_hours_and_batch_marks, history_replicas_racing_add_every_batch_once,
    history_sums_add_hours_into_their_buckets,
};

mod history_cases {
    use std::sync::Arc;

    use tollgate::history::{Batch, Counts, Dims, HistoryStore, Rollup, Subject};
    use tollgate::state::sql::SqlStore;

    use super::{Db, T0};

    /// 2026-11-18T00:00:00Z, the first hour the history cases use.
    const H0: i64 = T0 / 3600 * 3600;

    fn dims(customer: &str, app: &str, product: &str, meter: &str) -> Dims {
        Dims {
            customer: customer.to_owned(),
            app: app.to_owned(),
            product: product.to_owned(),
            meter: meter.to_owned(),
        }
    }

    fn counts(allowed: u64, denied: u64, billable: u64, value: u64) -> Counts {
        Counts {
            allowed,
            denied,
            billable,
            value,
        }
    }

    fn rollup(hour: i64, dims: &Dims, counts: Counts) -> Rollup {
        Rollup {
            hour,
            dims: dims.clone(),
            counts,
        }
    }

    fn batch(id: &str, rows: Vec<Rollup>) -> Batch {
        Batch {
            id: id.to_owned(),
            rows,
        }
    }

    fn customer(c: &str) -> Subject {
        Subject::Customer(c.to_owned())
    }

    pub(super) async fn history_batches_are_added_once(db: Db) {
        let store = db.store().await;
        let d = dims("cus_A", "app1", "basic", "api_calls");
        let b = batch(
            "prod-1:1795000000000:60000",
            vec![
                rollup(H0, &d, counts(10, 2, 9, 9)),
                rollup(H0 + 3600, &d, counts(1, 0, 1, 1)),
            ],
        );
        assert!(store.add(&b, T0).await.unwrap(), "first add");
        assert!(!store.add(&b, T0 + 1).await.unwrap(), "replayed add");
        // Another replica's pool replaying the same batch (same producer, same window) is refused too.
        let other = SqlStore::open(&db.url).unwrap();
        assert!(
            !other.add(&b, T0 + 2).await.unwrap(),
            "replayed on a second pool"
        );
        // Even with other rows: the batch id decides, not its content.
        let changed = batch(&b.id, vec![rollup(H0, &d, counts(100, 0, 100, 100))]);
        assert!(!store.add(&changed, T0 + 3).await.unwrap());
        let rows = store
            .hours(&customer("cus_A"), H0, H0 + 7200)
            .await
            .unwrap();
        assert_eq!(rows, b.rows);
        // An empty batch is marked like any other.
        let empty = batch("prod-1:1795000060000:60000", Vec::new());
        assert!(store.add(&empty, T0).await.unwrap());
        assert!(!store.add(&empty, T0).await.unwrap());
    }

    pub(super) async fn history_batches_into_the_same_hour_add_up(db: Db) {
        let store = db.store().await;
        let calls = dims("cus_A", "app1", "basic", "api_calls");
        let bytes = dims("cus_A", "app1", "basic", "bytes");
        let first = batch(
            "prod-1:1:60000",
            vec![
                rollup(H0, &calls, counts(10, 2, 9, 9)),
                rollup(H0, &bytes, counts(10, 2, 9, 4096)),
            ],
        );
        // Another window of the same hour, from another replica's spool, and one of the next hour.
        let second = batch(
            "prod-2:1:60000",
            vec![
                rollup(H0, &calls, counts(5, 1, 5, 5)),
                rollup(H0 + 3600, &calls, counts(7, 0, 7, 7)),
            ],
        );
        assert!(store.add(&first, T0).await.unwrap());
        assert!(store.add(&second, T0).await.unwrap());
        let rows = store
            .hours(&customer("cus_A"), H0, H0 + 2 * 3600)
            .await
            .unwrap();
        assert_eq!(
            rows,
            vec![
                rollup(H0, &calls, counts(15, 3, 14, 14)),
                rollup(H0, &bytes, counts(10, 2, 9, 4096)),
                rollup(H0 + 3600, &calls, counts(7, 0, 7, 7)),
            ]
        );
        // Values past 2^32 add up exactly.
        let big = batch(
            "prod-3:1:60000",
            vec![rollup(H0, &bytes, counts(0, 0, 0, 5_000_000_000))],
        );
        assert!(store.add(&big, T0).await.unwrap());
        let rows = store
            .hours(&customer("cus_A"), H0, H0 + 3600)
            .await
            .unwrap();
        assert_eq!(rows[1].counts.value, 5_000_004_096);
    }

    pub(super) async fn history_replicas_racing_add_every_batch_once(db: Db) {
        // Two pools stand for two replicas; 8 tasks each add the same 10 batches (every batch raced 8 times),
        // all into the same rows: each batch counts once, and no concurrent add is lost.
        let a = Arc::new(db.store().await);
        let b = Arc::new(SqlStore::open(&db.url).unwrap());
        let d = dims("cus_A", "app1", "basic", "api_calls");
        const BATCHES: u64 = 10;
        let mut tasks = Vec::new();
        for t in 0..8usize {
            let store = if t % 2 == 0 {
                Arc::clone(&a)
            } else {
                Arc::clone(&b)
            };
            let d = d.clone();
            tasks.push(tokio::spawn(async move {
                let mut added = 0u64;
                for i in 0..BATCHES {
                    // Each task walks the batches in its own order.
                    let i = (i + t as u64 * 3) % BATCHES;
                    let b = batch(
                        &format!("replica-{}:{i}:60000", i % 2),
                        vec![
                            rollup(H0, &d, counts(i + 1, 0, i + 1, 2 * (i + 1))),
                            rollup(H0 + 3600 * (i as i64 % 3), &d, counts(1, 1, 0, 0)),
                        ],
                    );
                    if store.add(&b, T0).await.expect("concurrent add") {
                        added += 1;
                    }
                }
                added
            }));
        }
        let mut added = 0;
        for task in tasks {
            added += task.await.unwrap();
        }
        assert_eq!(added, BATCHES, "every batch added by exactly one task");
        let rows = a
            .hours(&customer("cus_A"), H0, H0 + 3 * 3600)
            .await
            .unwrap();
        // 1 + 2 + … + 10 = 55; the second rows: batches 0, 3, 6, 9 into H0, 1, 4, 7 into H0+1h, 2, 5, 8 into
        // H0+2h.
        assert_eq!(
            rows,
            vec![
                rollup(H0, &d, counts(55 + 4, 4, 55, 110)),
                rollup(H0 + 3600, &d, counts(3, 3, 0, 0)),
                rollup(H0 + 7200, &d, counts(3, 3, 0, 0)),
            ]
        );
    }

    pub(super) async fn history_hours_filter_by_subject_and_range_in_order(db: Db) {
        let store = db.store().await;
        // Two customers; app2 changed customer (cus_A, then cus_B); an unidentified caller (no customer, no app).
        let a1 = dims("cus_A", "app1", "basic", "api_calls");
        let a1_gold = dims("cus_A", "app1", "gold", "api_calls");
        let a2 = dims("cus_A", "app2", "basic", "api_calls");
        let b2 = dims("cus_B", "app2", "basic", "api_calls");
        let b3 = dims("cus_B", "app3", "basic", "");
        let anon = dims("", "", "", "");
        let rows = vec![
            rollup(H0 + 2 * 3600, &a1, counts(1, 0, 1, 1)),
            rollup(H0, &a2, counts(2, 0, 2, 2)),
            rollup(H0, &a1_gold, counts(3, 0, 3, 3)),
            rollup(H0, &a1, counts(4, 0, 4, 4)),
            rollup(H0 + 3600, &b2, counts(5, 0, 5, 5)),
            rollup(H0, &b2, counts(6, 0, 6, 6)),
            rollup(H0, &b3, counts(7, 0, 0, 0)),
            rollup(H0, &anon, counts(0, 8, 0, 0)),
            rollup(H0 + 3 * 3600, &a1, counts(9, 0, 9, 9)),
        ];
        assert!(store.add(&batch("p:1:60000", rows), T0).await.unwrap());

        // By customer: that customer's rows only, in (hour, app, product, meter) order; `to` exclusive.
        let got = store
            .hours(&customer("cus_A"), H0, H0 + 3 * 3600)
            .await
            .unwrap();
        assert_eq!(
            got,
            vec![
                rollup(H0, &a1, counts(4, 0, 4, 4)),
                rollup(H0, &a1_gold, counts(3, 0, 3, 3)),
                rollup(H0, &a2, counts(2, 0, 2, 2)),
                rollup(H0 + 2 * 3600, &a1, counts(1, 0, 1, 1)),
            ]
        );
        // `from` inclusive.
        let got = store
            .hours(&customer("cus_A"), H0 + 2 * 3600, H0 + 4 * 3600)
            .await
            .unwrap();
        assert_eq!(
            got.iter().map(|r| r.hour).collect::<Vec<_>>(),
            [H0 + 7200, H0 + 10800]
        );
        // By app: every customer's rows of that app, by hour then customer.
        let got = store
            .hours(&Subject::App("app2".to_owned()), H0, H0 + 4 * 3600)
            .await
            .unwrap();
        assert_eq!(
            got,
            vec![
                rollup(H0, &a2, counts(2, 0, 2, 2)),
                rollup(H0, &b2, counts(6, 0, 6, 6)),
                rollup(H0 + 3600, &b2, counts(5, 0, 5, 5)),
            ]
        );
        let got = store
            .hours(&customer("cus_B"), H0, H0 + 3600)
            .await
            .unwrap();
        assert_eq!(
            got,
            vec![
                rollup(H0, &b2, counts(6, 0, 6, 6)),
                rollup(H0, &b3, counts(7, 0, 0, 0))
            ]
        );
        // Unknown subjects and empty ranges read nothing; the anonymous row is reachable only as "none".
        assert!(
            store
                .hours(&customer("cus_C"), H0, H0 + 86_400)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .hours(&customer("cus_A"), H0 + 3600, H0 + 3600)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .hours(&Subject::App("app%".to_owned()), H0, H0 + 86_400)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store.hours(&customer(""), H0, H0 + 86_400).await.unwrap(),
            vec![rollup(H0, &anon, counts(0, 8, 0, 0))]
        );
    }

    pub(super) async fn history_prune_drops_old_hours_and_batch_marks(db: Db) {
        let store = db.store().await;
        let d = dims("cus_A", "app1", "basic", "api_calls");
        let old = batch("p:old:60000", vec![rollup(H0, &d, counts(1, 0, 1, 1))]);
        let new = batch(
            "p:new:60000",
            vec![rollup(H0 + 3600, &d, counts(2, 0, 2, 2))],
        );
        assert!(store.add(&old, T0).await.unwrap());
        assert!(store.add(&new, T0 + 100).await.unwrap());

        // Rows of hours before the first bound go; marks added before the second go.
        store.prune(H0 + 3600, T0 + 50).await.unwrap();
        assert_eq!(
            store
                .hours(&customer("cus_A"), 0, H0 + 86_400)
                .await
                .unwrap(),
            vec![rollup(H0 + 3600, &d, counts(2, 0, 2, 2))]
        );
        // The newer mark is kept: a replay is still refused; the pruned mark no longer refuses.
        assert!(!store.add(&new, T0 + 200).await.unwrap());
        assert!(store.add(&old, T0 + 200).await.unwrap());
        // Pruning again at the same bounds changes nothing; bounds at 0 prune nothing.
        store.prune(0, 0).await.unwrap();
        store.prune(H0, T0 + 50).await.unwrap();
        assert_eq!(
            store
                .hours(&customer("cus_A"), 0, H0 + 86_400)
                .await
                .unwrap()
                .len(),
            2
        );
        store.prune(H0 + 86_400, T0 + 1000).await.unwrap();
        assert!(
            store
                .hours(&customer("cus_A"), 0, i64::MAX)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store.add(&new, T0 + 300).await.unwrap(),
            "its mark was pruned with it"
        );
    }

    /// The hourly rows summed per bucket in memory (what [`HistoryStore::sums`] must answer), sorted.
    fn summed(rows: &[Rollup], origin: i64, span: i64) -> Vec<Rollup> {
        let mut sums: std::collections::BTreeMap<(i64, Dims), Counts> = Default::default();
        for r in rows {
            let bucket = origin + (r.hour - origin) / span * span;
            sums.entry((bucket, r.dims.clone()))
                .or_default()
                .add(&r.counts);
        }
        sums.into_iter()
            .map(|((hour, dims), counts)| Rollup { hour, dims, counts })
            .collect()
    }

    fn sorted(mut rows: Vec<Rollup>) -> Vec<Rollup> {
        rows.sort_by(|a, b| (a.hour, &a.dims).cmp(&(b.hour, &b.dims)));
        rows
    }

    pub(super) async fn history_sums_add_hours_into_their_buckets(db: Db) {
        let store = db.store().await;
        // 2026-10-30T00:00Z and 2026-11-01T00:00Z: three days either side of a month's end, every third hour,
        // two customers sharing app2.
        let (oct30, nov1, dec1) = (1_793_318_400, 1_793_491_200, 1_796_083_200);
        let all = [
            dims("cus_A", "app1", "basic", "api_calls"),
            dims("cus_A", "app1", "gold", "tokens"),
            dims("cus_A", "app2", "basic", "api_calls"),
            dims("cus_B", "app2", "basic", "api_calls"),
            dims("cus_B", "app3", "basic", ""),
        ];
        let mut rows = Vec::new();
        for h in (0..6 * 24).step_by(3) {
            for (i, d) in all.iter().enumerate() {
                let n = (h * 7 + i as i64) as u64;
                rows.push(rollup(
                    oct30 + h * 3600,
                    d,
                    counts(n, n % 3, n / 2, n * 1_000_000),
                ));
            }
        }
        // Split into two batches per day (two replicas), so the store adds before it sums.
        for (i, chunk) in rows.chunks(rows.len() / 12 + 1).enumerate() {
            assert!(
                store
                    .add(&batch(&format!("r{}:{i}:60000", i % 2), chunk.to_vec()), T0)
                    .await
                    .unwrap()
            );
        }
        let (from, to) = (oct30 + 5 * 3600, oct30 + 5 * 86_400 + 3600);
        for subject in [
            customer("cus_A"),
            customer("cus_B"),
            Subject::App("app2".to_owned()),
        ] {
            let hours = store.hours(&subject, from, to).await.unwrap();
            assert!(!hours.is_empty());
            // By hour, by day (epoch-aligned), by three hours.
            for span in [3600, 86_400, 3 * 3600] {
                let got = sorted(store.sums(&subject, from, to, 0, span).await.unwrap());
                assert_eq!(got, summed(&hours, 0, span), "{subject:?} span {span}");
            }
            // October's part and November's part as one bucket each.
            let october = sorted(
                store
                    .sums(&subject, from, nov1, oct30 - 29 * 86_400, 31 * 86_400)
                    .await
                    .unwrap(),
            );
            assert!(october.iter().all(|r| r.hour == oct30 - 29 * 86_400));
            let oct_hours: Vec<Rollup> = hours.iter().filter(|r| r.hour < nov1).cloned().collect();
            assert_eq!(
                october,
                summed(&oct_hours, oct30 - 29 * 86_400, 31 * 86_400)
            );
            let november = sorted(
                store
                    .sums(&subject, nov1, to, nov1, dec1 - nov1)
                    .await
                    .unwrap(),
            );
            let nov_hours: Vec<Rollup> = hours.iter().filter(|r| r.hour >= nov1).cloned().collect();
            assert_eq!(november, summed(&nov_hours, nov1, dec1 - nov1));
            // The store's sums equal the default (in-memory) ones.
            let total: u64 = november.iter().map(|r| r.counts.value).sum();
            assert_eq!(total, nov_hours.iter().map(|r| r.counts.value).sum::<u64>());
        }
        // Only the subject's rows; nothing outside the range (the rows end after 6 days).
        let b = store
            .sums(&customer("cus_B"), from, to, 0, 86_400)
            .await
            .unwrap();
        assert!(b.iter().all(|r| r.dims.customer == "cus_B"));
        assert!(
            store
                .sums(
                    &customer("cus_A"),
                    oct30 + 6 * 86_400,
                    oct30 + 9 * 86_400,
                    0,
                    86_400
                )
                .await
                .unwrap()
                .is_empty()
        );
        // Sums past 2^32 stay exact (PostgreSQL sums BIGINT as NUMERIC).
        let month = store
            .sums(&customer("cus_A"), nov1, dec1, nov1, dec1 - nov1)
            .await
            .unwrap();
        let value: u64 = month.iter().map(|r| r.counts.value).sum();
        assert!(value > 1 << 32, "{value}");
    }
}
