//! The `tollgate` command line: serve, check, key, token, billing.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use tollgate::app::config::Config;
use tollgate::billing::Requeue;
use tollgate::catalog::{self, Catalog, Status};
use tollgate::identity::api_key::{self, KeyHash, KeyKind};
use tollgate::identity::jwt::{JwtMetrics, JwtVerifier, mint_hs256};
use tollgate::source::SourceError;

// glibc's malloc took ~12 % of the CPU of a Check plus its access-log record (many small, short-lived
// allocations across threads) and kept freed catalog parse trees in its arenas after reloads (RSS 65 MB ->
// 341 MB after 8 reloads of a 15 MB catalog; jemalloc: 76 -> 140 MB). See BENCHMARKS.md.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// An Envoy ext_authz sidecar that sells and protects APIs: API keys, API products and quotas.
#[derive(Parser)]
#[command(name = "tollgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar: gRPC (ext_authz, access-log service, health) and admin HTTP.
    Serve(ConfigArg),
    /// Validate the config and the catalog without serving, and print a summary.
    Check(ConfigArg),
    /// Make and hash API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Make JWTs for local testing.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Stripe billing: compare with Stripe, re-queue dead letters.
    #[command(subcommand)]
    Billing(BillingCommand),
    /// The state store of run-time developers, apps and keys.
    #[command(subcommand)]
    State(StateCommand),
    /// Convert another API manager's exports into a catalog.
    #[command(subcommand)]
    Import(ImportCommand),
}

#[derive(Subcommand)]
enum ImportCommand {
    /// Convert Apigee Edge / Apigee X JSON exports into a catalog (stdout); what cannot be mapped goes to stderr.
    Apigee(tollgate::import::apigee::Options),
}

#[derive(Subcommand)]
enum StateCommand {
    /// Create or upgrade the state store's schema (`serve` does it too at start).
    Migrate(ConfigArg),
}

#[derive(Subcommand)]
enum BillingCommand {
    /// Compare Stripe's meter event summaries with what this tollgate sent; exit 1 on any mismatch.
    Reconcile {
        /// The config file (its billing.stripe and metering.dir).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Start of the period (RFC 3339, or a date: 2026-11-01 is midnight UTC).
        #[arg(long, value_parser = parse_instant)]
        since: chrono::DateTime<chrono::Utc>,
        /// End of the period (exclusive), same forms.
        #[arg(long, value_parser = parse_instant)]
        until: chrono::DateTime<chrono::Utc>,
    },
    /// Send dead-lettered events again (safe while `tollgate serve` runs: it picks them up).
    Requeue {
        /// The config file (its metering.dir).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Dead-letter ids (the events' identifiers).
        #[arg(required_unless_present = "all")]
        ids: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print an HS256 token signed with a configured provider's `hs256_secret` (for the quickstart and tests).
    Mint(MintArgs),
}

#[derive(Args)]
struct MintArgs {
    /// The config file whose `identity.jwt` names the provider.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// The provider (default: the first one with an `hs256_secret`).
    #[arg(long)]
    provider: Option<String>,
    /// The `sub` claim (the developer).
    #[arg(long)]
    sub: String,
    /// The app claim: a catalog app's `client_id`.
    #[arg(long)]
    client_id: Option<String>,
    /// The company claim.
    #[arg(long)]
    company: Option<String>,
    /// Products the token itself entitles (repeatable).
    #[arg(long = "product")]
    products: Vec<String>,
    /// Scopes, space-separated.
    #[arg(long)]
    scope: Option<String>,
    /// Lifetime, like 15m or 1h.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: std::time::Duration,
}

#[derive(Args)]
struct ConfigArg {
    /// The config file (YAML).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Print a fresh random API key and the catalog line that stores its hash.
    New {
        /// A key for live traffic (tg_live_…).
        #[arg(long, conflicts_with = "test")]
        live: bool,
        /// A key for test traffic (tg_test_…, the default).
        #[arg(long)]
        test: bool,
    },
    /// Print the hash the catalog stores for KEY (`-` reads the key from stdin, keeping it out of shell history).
    Hash {
        /// The API key, or `-`.
        key: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(&args.config),
        Command::Check(args) => check(&args.config),
        Command::Key(KeyCommand::New { live, .. }) => {
            let key = api_key::generate(if live { KeyKind::Live } else { KeyKind::Test });
            emit(&format!(
                "{key}\n- {{hash: \"{}\", status: approved}}\n",
                KeyHash::of(&key)
            ))
        }
        Command::Key(KeyCommand::Hash { key }) => hash(&key),
        Command::Token(TokenCommand::Mint(args)) => mint(&args),
        Command::Billing(BillingCommand::Reconcile {
            config,
            since,
            until,
        }) => reconcile(&config, since, until),
        Command::Billing(BillingCommand::Requeue { config, all, ids }) => {
            requeue(&config, all, ids)
        }
        Command::State(StateCommand::Migrate(args)) => migrate(&args.config),
        Command::Import(ImportCommand::Apigee(options)) => {
            tollgate::import::apigee::run(&options).map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<SourceError>() {
                Some(source_error) => eprintln!("{source_error}"),
                None => eprintln!("tollgate: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn serve(config_path: &Path) -> anyhow::Result<()> {
    tollgate::app::logging::init_logging();
    let config = Config::load(config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(tollgate::app::serve::serve(config))?;
    Ok(())
}

fn migrate(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let url = config.state_url();
    runtime.block_on(async {
        let store = tollgate::state::sql::SqlStore::open(url)?;
        store.migrate().await?;
        store.close().await;
        Ok::<(), tollgate::state::StoreError>(())
    })?;
    emit(&format!(
        "state store schema is current ({})\n",
        tollgate::state::sql::redacted(url)
    ))
}

fn mint(args: &MintArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let Some(jwt) = &config.identity.jwt else {
        anyhow::bail!(
            "{} configures no identity.jwt providers",
            args.config.display()
        );
    };
    let provider = match &args.provider {
        Some(name) => jwt.providers.iter().find(|p| &p.name == name),
        None => jwt.providers.iter().find(|p| p.hs256_secret.is_some()),
    };
    let Some(provider) = provider else {
        anyhow::bail!(
            "no matching provider with an hs256_secret in {}",
            args.config.display()
        );
    };
    let mut extra = serde_json::Map::new();
    let claims = &provider.claims;
    if let Some(company) = &args.company {
        extra.insert(claims.company.clone(), company.clone().into());
    }
    if !args.products.is_empty() {
        extra.insert(claims.products.clone(), args.products.clone().into());
    }
    if let Some(scope) = &args.scope {
        extra.insert(claims.scope.clone(), scope.clone().into());
    }
    let token = mint_hs256(
        provider,
        &args.sub,
        args.client_id.as_deref(),
        &extra,
        args.ttl,
    )?;
    emit(&format!("{token}\n"))
}

/// An instant given as RFC 3339 or as a date (midnight UTC).
fn parse_instant(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| format!("{text:?} is neither an RFC 3339 time nor a YYYY-MM-DD date"))
}

fn reconcile(
    config_path: &Path,
    since: chrono::DateTime<chrono::Utc>,
    until: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let Some(billing) = &config.billing else {
        anyhow::bail!("{} configures no billing", config_path.display());
    };
    if since >= until {
        anyhow::bail!("--since must be before --until");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(tollgate::billing::reconcile(
        &billing.stripe,
        &config.metering.dir,
        since,
        until,
    ))?;
    emit(&format!("{report}"))?;
    let mismatches = report.mismatches().len();
    if mismatches > 0 {
        anyhow::bail!("{mismatches} (customer, meter) pairs disagree with Stripe");
    }
    Ok(())
}

fn requeue(config_path: &Path, all: bool, ids: Vec<String>) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let which = if all { Requeue::All } else { Requeue::Ids(ids) };
    let outcome = tollgate::billing::requeue(&config.metering.dir, &which)?;
    let mut out = format!("re-queued {} event(s)\n", outcome.requeued.len());
    for id in &outcome.requeued {
        let _ = writeln!(out, "  {id}");
    }
    emit(&out)?;
    if !outcome.unknown.is_empty() {
        anyhow::bail!("not dead letters: {}", outcome.unknown.join(", "));
    }
    Ok(())
}

fn hash(key: &str) -> anyhow::Result<()> {
    let key = if key == "-" {
        let mut buf = String::new();
        std::io::stdin()
            .read_to_string(&mut buf)
            .context("cannot read the key from stdin")?;
        buf.trim().to_owned()
    } else {
        key.to_owned()
    };
    if key.is_empty() {
        anyhow::bail!("the key is empty");
    }
    emit(&format!("{}\n", KeyHash::of(&key)))
}

/// Fetches `catalog.url` once and validates it (no cache: `check` tells what the remote serves now).
fn fetch_catalog(config: &Config) -> anyhow::Result<(Catalog, String)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let metrics = catalog::metrics::CatalogMetrics::register(&prometheus::Registry::new())
        .context("metrics setup failed")?;
    let remote = catalog::remote::Remote::new(&config.catalog, &config.metering.dir, metrics)?;
    let loaded = runtime.block_on(remote.fetch_valid())?;
    Ok((loaded.catalog, remote.shown().to_owned()))
}

fn check(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let (catalog, catalog_name) = match &config.catalog.path {
        Some(path) => (catalog::load(path)?, path.display().to_string()),
        None => fetch_catalog(&config)?,
    };
    if let Some(jwt) = &config.identity.jwt {
        // Building the verifier reads key files and checks every provider; JWKS fetch failures are not fatal.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let metrics =
            JwtMetrics::register(&prometheus::Registry::new()).context("metrics setup failed")?;
        runtime
            .block_on(JwtVerifier::new(jwt, &config.base_dir, &metrics))
            .map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
    }
    let mut out = String::new();
    let _ = writeln!(out, "config  {}: ok", config_path.display());
    let _ = writeln!(
        out,
        "        grpc {}, admin {}, environment {}, quota store {} (on error: {})",
        config.grpc_listen,
        config.admin_listen,
        config.environment.as_deref().unwrap_or("(none)"),
        format!("{:?}", config.quota.store).to_lowercase(),
        format!("{:?}", config.quota.on_store_error).to_lowercase(),
    );
    let _ = writeln!(
        out,
        "        state store {} (sync every {}; not contacted by check)",
        tollgate::state::sql::redacted(config.state_url()),
        humantime::format_duration(config.state.sync_interval),
    );
    if catalog.products().iter().any(|p| p.prepaid.is_some()) {
        let _ = writeln!(
            out,
            "        credits in the state store (leases up to {}, low balance below {})",
            config.credits.max_lease, config.credits.low_balance,
        );
    }
    if let Some(billing) = &config.billing {
        let stripe = &billing.stripe;
        let _ = writeln!(
            out,
            "        Stripe webhook {} (grace {}, resync every {})",
            if stripe.webhook_secret().is_some() {
                "on: POST /stripe/webhook"
            } else {
                "off (no webhook_secret)"
            },
            humantime::format_duration(stripe.grace_period),
            humantime::format_duration(stripe.resync_interval),
        );
    }
    let _ = writeln!(out, "catalog {catalog_name}: ok");
    summarize(&mut out, &catalog);
    if config.billing.is_none()
        && catalog
            .products()
            .iter()
            .any(|p| !p.credit_prices.is_empty())
    {
        let _ = writeln!(
            out,
            "warning: products have stripe_credit_prices but billing.stripe is not configured: no paid invoice \
             ever reaches tollgate, so credits are only granted through POST /v1/credits"
        );
    }
    if config.billing.is_none() && !catalog.sold_through_stripe().is_empty() {
        let _ = writeln!(
            out,
            "warning: products have stripe_prices but billing.stripe is not configured: tollgate never learns of \
             a subscription, so every call to them is refused (403)"
        );
    }
    emit(&out)
}

/// Writes to stdout; a closed pipe (`tollgate key new | head -1`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

/// The one-screen catalog summary of `tollgate check`.
fn summarize(out: &mut String, catalog: &Catalog) {
    let products = catalog.products();
    let _ = writeln!(out, "  products  {}", products.len());
    for p in products {
        let ops = p.operations.len();
        let quota = p
            .quota
            .iter()
            .map(|l| {
                format!(
                    "{}/{}{}",
                    l.limit,
                    if l.interval == 1 {
                        String::new()
                    } else {
                        format!("{} ", l.interval)
                    },
                    l.unit.as_str()
                )
            })
            .collect::<Vec<_>>()
            .join(" + ");
        let sold = match p.stripe_prices.len() {
            0 => String::new(),
            n => format!(
                ", sold through Stripe ({n} price{})",
                if n == 1 { "" } else { "s" }
            ),
        };
        let prepaid = match p.prepaid {
            None => String::new(),
            Some(prepaid) => {
                let refill = prepaid.refill.map_or(String::new(), |r| {
                    format!(", refilled to {} each {}", r.amount, r.every.as_str())
                });
                let topups = match p.credit_prices.len() {
                    0 => String::new(),
                    n => format!(", {n} top-up price{}", if n == 1 { "" } else { "s" }),
                };
                format!(
                    ", prepaid ({} credit{} a call{refill}{topups})",
                    prepaid.cost,
                    if prepaid.cost == 1 { "" } else { "s" }
                )
            }
        };
        let _ = writeln!(
            out,
            "    {:<24} {} operation{}, quota {}, environments {}{sold}{prepaid}",
            p.name,
            ops,
            if ops == 1 { "" } else { "s" },
            if quota.is_empty() {
                "none".to_owned()
            } else {
                quota
            },
            if p.environments.is_empty() {
                "all".to_owned()
            } else {
                p.environments.join(",")
            },
        );
    }
    let revoked_apps = catalog
        .apps()
        .filter(|(_, a)| a.status == Status::Revoked)
        .count();
    let _ = writeln!(
        out,
        "  developers {}, apps {} ({} revoked)",
        catalog.developer_count(),
        catalog.app_count(),
        revoked_apps
    );
    let now = tollgate::util::clock::unix_now();
    let (mut approved, mut revoked, mut expired) = (0, 0, 0);
    for key in catalog.keys() {
        if key.status == Status::Revoked {
            revoked += 1;
        } else if key.expires_at.is_some_and(|t| t <= now) {
            expired += 1;
        } else {
            approved += 1;
        }
    }
    let _ = writeln!(
        out,
        "  keys      {} ({approved} usable, {revoked} revoked, {expired} expired)",
        catalog.key_count()
    );
    let meters: Vec<String> = products
        .iter()
        .filter_map(|p| {
            p.meter
                .as_ref()
                .map(|m| format!("{} ({})", m.event_name, p.name))
        })
        .collect();
    let _ = writeln!(
        out,
        "  meters    {}",
        if meters.is_empty() {
            "none".to_owned()
        } else {
            meters.join(", ")
        }
    );
}
