//! The spend engine on a real ledger (SQLite in a temporary folder): leases, holds, refills at a calendar
//! boundary (an injected clock), two replicas sharing one balance, and what a crash costs.

use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use tollgate::credits::journal::Journal;
use tollgate::credits::ledger::{CreditLedger, GrantInput, Granted, Refill};
use tollgate::credits::{CreditMetrics, CreditOptions, Credits, Spend};
use tollgate::state::sql::SqlStore;

/// 2027-01-31T23:59:59Z and the second after it.
const JAN_31_LAST: i64 = 1_801_439_999;
const FEB_1: i64 = 1_801_440_000;
/// Bound of a flush in these tests.
const FLUSH: Duration = Duration::from_secs(10);

async fn ledger(dir: &tempfile::TempDir) -> Arc<SqlStore> {
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let store = SqlStore::open(&url).expect("open");
    store.migrate().await.expect("migrate");
    Arc::new(store)
}

fn options(max_lease: u64) -> CreditOptions {
    CreditOptions {
        max_lease,
        low_balance: 5,
        exhausted_for: Duration::ZERO,
        timeout: Duration::from_secs(5),
    }
}

fn engine(store: &Arc<SqlStore>, replica: &str, max_lease: u64) -> (Credits, Registry) {
    engine_with(store, replica, max_lease, None)
}

/// An engine journaling its spends in `journal_dir`, as `serve` does in `metering.dir`.
fn engine_with(
    store: &Arc<SqlStore>,
    replica: &str,
    max_lease: u64,
    journal_dir: Option<&std::path::Path>,
) -> (Credits, Registry) {
    let registry = Registry::new();
    let metrics = CreditMetrics::new(&registry).expect("metrics");
    let journal = journal_dir.map(|dir| Journal::open(dir, replica).expect("journal"));
    let credits = Credits::start(
        Arc::clone(store) as Arc<dyn CreditLedger>,
        replica.to_owned(),
        options(max_lease),
        metrics,
        journal,
    );
    (credits, registry)
}

async fn grant(store: &SqlStore, owner: &str, amount: i64, source: &str) {
    let input = GrantInput {
        owner,
        amount,
        reason: "test",
        source,
        low_balance: 5,
        now: JAN_31_LAST,
    };
    assert!(matches!(
        store.grant(&input).await.expect("grant"),
        Granted::New(_)
    ));
}

/// Spends one call of `cost` and commits it; `None` when the balance cannot cover it.
async fn spend(
    credits: &Credits,
    owner: &str,
    cost: u64,
    refill: Option<Refill<'_>>,
    now: i64,
) -> Option<u64> {
    match credits
        .take(owner, cost, refill, now)
        .await
        .expect("ledger answers")
    {
        Spend::Held(hold) => Some(credits.commit(hold)),
        Spend::Exhausted { .. } => None,
    }
}

fn metric(registry: &Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_spend_exactly_the_balance_and_a_dropped_hold_spends_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ledger(&dir).await;
    grant(&store, "acme", 25, "api:first").await;
    let (credits, registry) = engine(&store, "r1", 100);

    // A hold given back (the quota refused the call) leaves the balance as it was.
    let Spend::Held(hold) = credits
        .take("acme", 3, None, JAN_31_LAST)
        .await
        .expect("take")
    else {
        panic!("25 credits cover 3");
    };
    drop(hold);
    let mut allowed = 0;
    while spend(&credits, "acme", 3, None, JAN_31_LAST)
        .await
        .is_some()
    {
        allowed += 1;
        assert!(allowed <= 8, "25 credits at 3 a call are 8 calls");
    }
    assert_eq!(allowed, 8);
    credits.flush(JAN_31_LAST, FLUSH).await.expect("flush");
    let b = store.balance("acme").await.expect("read").expect("account");
    assert_eq!((b.granted, b.spent, b.reserved, b.balance), (25, 24, 0, 1));
    assert_eq!(metric(&registry, "credits_spent_total"), 24.0);
    // One credit left: a call of cost 1 still fits, exactly once.
    assert!(
        spend(&credits, "acme", 1, None, JAN_31_LAST)
            .await
            .is_some()
    );
    assert!(
        spend(&credits, "acme", 1, None, JAN_31_LAST)
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_balance_and_never_overspend_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ledger(&dir).await;
    grant(&store, "acme", 500, "api:first").await;
    let (a, _ra) = engine(&store, "a", 16);
    let (b, _rb) = engine(&store, "b", 16);
    let (a, b) = (Arc::new(a), Arc::new(b));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let credits = Arc::clone(if i % 2 == 0 { &a } else { &b });
        tasks.push(tokio::spawn(async move {
            let mut allowed = 0u64;
            let mut refusals = 0;
            // Refusals may come while the other replica still holds leased credits: stop after several.
            for _ in 0..2_000 {
                match spend(&credits, "acme", 1, None, JAN_31_LAST).await {
                    Some(_) => allowed += 1,
                    None => {
                        refusals += 1;
                        if refusals > 20 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            allowed
        }));
    }
    let mut allowed = 0;
    for task in tasks {
        allowed += task.await.expect("task");
    }
    a.flush(JAN_31_LAST, FLUSH).await.expect("flush a");
    b.flush(JAN_31_LAST, FLUSH).await.expect("flush b");
    let account = store.balance("acme").await.expect("read").expect("account");
    assert_eq!(account.reserved, 0);
    assert_eq!(
        account.spent, allowed as i64,
        "every allowed call is spent, none twice"
    );
    assert!(allowed <= 500, "never more than granted: {allowed}");
    assert_eq!(account.granted - account.spent, account.balance);
    // Whatever one replica held back when the tasks stopped is spendable now.
    let mut more = 0;
    while spend(&a, "acme", 1, None, JAN_31_LAST).await.is_some() {
        more += 1;
    }
    assert_eq!(allowed + more, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refill_tops_the_balance_up_once_per_calendar_month() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ledger(&dir).await;
    let (credits, registry) = engine(&store, "r1", 4);
    let january = Refill {
        product: "free",
        amount: 10,
        period_start: 1_798_761_600,
    };
    let february = Refill {
        period_start: FEB_1,
        ..january
    };
    let mut calls = 0;
    while spend(&credits, "dev@example.com", 1, Some(january), JAN_31_LAST)
        .await
        .is_some()
    {
        calls += 1;
        assert!(calls <= 10);
    }
    assert_eq!(calls, 10, "January's refill gives 10 calls, once");
    // The first call of February refills to 10 again; January's spends are not refunded.
    let left = spend(&credits, "dev@example.com", 1, Some(february), FEB_1).await;
    assert_eq!(left, Some(9));
    credits.flush(FEB_1, FLUSH).await.expect("flush");
    let b = store
        .balance("dev@example.com")
        .await
        .expect("read")
        .expect("account");
    assert_eq!((b.granted, b.spent, b.balance), (20, 11, 9));
    let sources: Vec<String> = store
        .grants("dev@example.com", 10)
        .await
        .expect("grants")
        .into_iter()
        .map(|g| g.source)
        .collect();
    assert_eq!(
        sources,
        vec![
            format!("refill:dev@example.com:free:{FEB_1}"),
            "refill:dev@example.com:free:1798761600".to_owned()
        ]
    );
    let refilled: f64 = registry
        .gather()
        .iter()
        .filter(|f| f.name() == "credits_granted_total")
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| m.get_label().iter().any(|l| l.value() == "refill"))
        .map(|m| m.get_counter().get_value())
        .sum();
    assert_eq!(refilled, 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_spend_journal_a_crash_costs_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ledger(&dir).await;
    grant(&store, "acme", 1_000, "api:first").await;
    grant(&store, "dev@example.com", 100, "api:dev-first").await;
    let (credits, _) = engine_with(&store, "r1", 20, Some(dir.path()));
    for _ in 0..7 {
        assert!(
            spend(&credits, "acme", 1, None, JAN_31_LAST)
                .await
                .is_some()
        );
    }
    for _ in 0..3 {
        assert!(
            spend(&credits, "dev@example.com", 2, None, JAN_31_LAST)
                .await
                .is_some()
        );
    }
    // A hold in flight when the process dies was never allowed: it is not served.
    let Spend::Held(_in_flight) = credits
        .take("acme", 1, None, JAN_31_LAST)
        .await
        .expect("take")
    else {
        panic!("credits left");
    };
    // A kill -9: nothing returned, nothing reported; the journal's pages are the kernel's.
    std::mem::forget(_in_flight);
    drop(credits);
    assert!(
        store
            .balance("acme")
            .await
            .expect("read")
            .expect("account")
            .reserved
            > 0
    );

    let (restarted, registry) = engine_with(&store, "r1", 20, Some(dir.path()));
    restarted.recover().await.expect("recover");
    let acme = store.balance("acme").await.expect("read").expect("account");
    let dev = store
        .balance("dev@example.com")
        .await
        .expect("read")
        .expect("account");
    assert_eq!(
        (acme.spent, acme.reserved, acme.balance),
        (7, 0, 993),
        "exactly the allowed calls"
    );
    assert_eq!((dev.spent, dev.reserved, dev.balance), (6, 0, 94));
    assert_eq!(metric(&registry, "credits_recovered_total"), 0.0);
    // The new life journals from zero, and a second crash is settled exactly too.
    assert!(
        spend(&restarted, "acme", 1, None, JAN_31_LAST)
            .await
            .is_some()
    );
    drop(restarted);
    let (third, _) = engine_with(&store, "r1", 20, Some(dir.path()));
    third.recover().await.expect("recover");
    let acme = store.balance("acme").await.expect("read").expect("account");
    assert_eq!((acme.spent, acme.reserved), (8, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_never_gives_spent_credits_back_and_costs_at_most_one_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ledger(&dir).await;
    grant(&store, "acme", 1_000, "api:first").await;
    let (credits, _) = engine(&store, "r1", 20);
    let mut served = 0;
    for _ in 0..7 {
        assert!(
            spend(&credits, "acme", 1, None, JAN_31_LAST)
                .await
                .is_some()
        );
        served += 1;
    }
    // A kill -9: nothing is returned or reported.
    drop(credits);
    let held = store.balance("acme").await.expect("read").expect("account");
    assert!(
        held.reserved >= served,
        "the served credits were reserved before they were spent"
    );
    assert!(
        held.reserved <= 21,
        "one lease: at most max_lease + the call's cost"
    );

    let (restarted, registry) = engine(&store, "r1", 20);
    restarted.recover().await.expect("recover");
    let after = store.balance("acme").await.expect("read").expect("account");
    assert_eq!(after.reserved, 0);
    assert_eq!(
        after.spent, held.reserved,
        "all the dead life held stays spent"
    );
    let lost = after.spent - served;
    assert!(
        (0..=21).contains(&lost),
        "a crash costs at most one lease: {lost}"
    );
    assert_eq!(
        metric(&registry, "credits_recovered_total"),
        held.reserved as f64
    );
    // The new life spends from zero again, and its reports count.
    assert!(
        spend(&restarted, "acme", 1, None, JAN_31_LAST)
            .await
            .is_some()
    );
    restarted.flush(JAN_31_LAST, FLUSH).await.expect("flush");
    let last = store.balance("acme").await.expect("read").expect("account");
    assert_eq!(last.spent, after.spent + 1);
    assert_eq!(last.granted - last.spent, last.balance);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_owner_is_refused_from_memory_until_a_grant_here_or_the_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ledger(&dir).await;
    let registry = Registry::new();
    let credits = Credits::start(
        Arc::clone(&store) as Arc<dyn CreditLedger>,
        "r1".to_owned(),
        CreditOptions {
            exhausted_for: Duration::from_secs(3_600),
            ..options(10)
        },
        CreditMetrics::new(&registry).expect("metrics"),
        None,
    );
    assert!(
        spend(&credits, "acme", 1, None, JAN_31_LAST)
            .await
            .is_none()
    );
    grant(&store, "acme", 5, "api:late").await;
    // Within the bound the replica does not ask again…
    assert!(
        spend(&credits, "acme", 1, None, JAN_31_LAST)
            .await
            .is_none()
    );
    // …unless the grant went through it.
    credits.granted("acme");
    assert_eq!(spend(&credits, "acme", 1, None, JAN_31_LAST).await, Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_do_not_grow_the_lease_past_its_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ledger(&dir).await;
    grant(&store, "acme", 10_000, "api:first").await;
    let (credits, registry) = engine(&store, "r1", 10);
    // 200 calls in flight at once (held, not yet committed).
    let mut holds = Vec::new();
    for _ in 0..200 {
        let Spend::Held(hold) = credits
            .take("acme", 1, None, JAN_31_LAST)
            .await
            .expect("take")
        else {
            panic!("10,000 credits cover 200 calls");
        };
        holds.push(hold);
    }
    let account = store.balance("acme").await.expect("read").expect("account");
    assert!(
        account.reserved <= 200 + 10 + 1,
        "held: the calls in flight + max_lease + one call, not more: {}",
        account.reserved
    );
    let calls: f64 = registry
        .gather()
        .iter()
        .filter(|f| f.name() == "credits_ledger_calls_total")
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| m.get_label().iter().any(|l| l.value() == "lease"))
        .map(|m| m.get_counter().get_value())
        .sum();
    assert!(
        calls <= 30.0,
        "leases keep coming while calls are in flight, not one ledger call per Check: {calls}"
    );
    for hold in holds {
        credits.commit(hold);
    }
    credits.flush(JAN_31_LAST, FLUSH).await.expect("flush");
    let account = store.balance("acme").await.expect("read").expect("account");
    assert_eq!((account.spent, account.reserved), (200, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_the_journal_cannot_name_keeps_its_lease_as_spent_after_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ledger(&dir).await;
    // Longer than a journal slot holds: its spends are not journaled.
    let long = "x".repeat(300);
    grant(&store, &long, 1_000, "api:long").await;
    let (credits, _) = engine_with(&store, "r1", 100, Some(dir.path()));
    for _ in 0..50 {
        assert!(spend(&credits, &long, 1, None, JAN_31_LAST).await.is_some());
    }
    drop(credits);
    let (restarted, registry) = engine_with(&store, "r1", 100, Some(dir.path()));
    restarted.recover().await.expect("recover");
    let account = store.balance(&long).await.expect("read").expect("account");
    assert!(
        account.spent >= 50,
        "the 50 served credits are never given back: {account:?}"
    );
    assert_eq!(account.reserved, 0);
    assert_eq!(
        metric(&registry, "credits_recovered_total"),
        account.spent as f64
    );
}
