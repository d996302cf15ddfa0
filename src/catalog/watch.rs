//! Keeps the catalog current: reloads the file when it changes, keeps the last good catalog when an edit is bad.
//!
//! The watcher observes the file's folder rather than the file: editors save by renaming a new file over the
//! old one and Kubernetes swaps a ConfigMap's `..data` symlink, and both replace the inode a file watch holds.
//! A slow poll backs the watcher up on filesystems that emit no events. Reloads of identical content are skipped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use super::{Catalog, CatalogHandle};
use crate::catalog::metrics::CatalogMetrics;
use crate::source::{Source, SourceError};

/// Events closer together than this are taken as one edit.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// How often the file is re-read when no event arrives.
const POLL: Duration = Duration::from_secs(10);

/// A catalog read from disk, with the digest of the bytes it came from.
pub struct Loaded {
    /// The validated catalog.
    pub catalog: Catalog,
    digest: [u8; 32],
}

/// Why the watcher could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {source}")]
pub struct WatchError {
    path: PathBuf,
    #[source]
    source: notify::Error,
}

/// Reads and validates the catalog at `path`, unless its bytes hash to `known` (then `None`). Runs on a
/// blocking thread: large catalogs take a while to parse.
pub async fn read(path: &Path, known: Option<[u8; 32]>) -> Result<Option<Loaded>, SourceError> {
    let path = path.to_path_buf();
    blocking(move || validate(Source::read(&path)?, known)).await
}

/// Validates catalog `text` (named `name` in errors), unless it hashes to `known` (then `None`), on a blocking
/// thread. The text is taken as it is: no `${VAR}` expansion.
pub async fn parse_text(
    name: PathBuf,
    text: String,
    known: Option<[u8; 32]>,
) -> Result<Option<Loaded>, SourceError> {
    blocking(move || validate(Source::from_text(name, text), known)).await
}

fn validate(source: Source, known: Option<[u8; 32]>) -> Result<Option<Loaded>, SourceError> {
    let digest: [u8; 32] = Sha256::digest(source.text().as_bytes()).into();
    if known == Some(digest) {
        return Ok(None);
    }
    let catalog = super::parse(&source)?;
    Ok(Some(Loaded { catalog, digest }))
}

async fn blocking(
    load: impl FnOnce() -> Result<Option<Loaded>, SourceError> + Send + 'static,
) -> Result<Option<Loaded>, SourceError> {
    match tokio::task::spawn_blocking(load).await {
        Ok(result) => result,
        Err(e) => Err(SourceError {
            file: PathBuf::new(),
            position: None,
            message: format!("catalog load was interrupted: {e}"),
        }),
    }
}

/// Where a validated catalog goes: it may still refuse it (a name the state store holds), with the reason.
pub type Installer = Arc<dyn Fn(Catalog) -> Result<(), String> + Send + Sync>;

/// An installer that serves each catalog as it is, through `handle`.
pub fn into_handle(handle: Arc<CatalogHandle>) -> Installer {
    Arc::new(move |catalog| {
        handle.replace(catalog);
        Ok(())
    })
}

/// Installs a loaded catalog and updates the catalog metrics; returns the digest now served.
pub fn install(
    installer: &Installer,
    loaded: Loaded,
    metrics: &CatalogMetrics,
) -> Result<[u8; 32], String> {
    let c = &loaded.catalog;
    let (products, apps, keys) = (c.products().len(), c.app_count(), c.key_count());
    installer(loaded.catalog)?;
    metrics
        .products
        .set(i64::try_from(products).unwrap_or(i64::MAX));
    metrics.generation.inc();
    tracing::info!(
        generation = metrics.generation.get(),
        products,
        apps,
        keys,
        "catalog loaded"
    );
    Ok(loaded.digest)
}

/// Watches `path` and swaps each valid new version into `handle` until `shutdown` changes.
pub async fn run(
    path: PathBuf,
    installer: Installer,
    mut digest: [u8; 32],
    metrics: CatalogMetrics,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), WatchError> {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let folder = path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let name = path.file_name().map(|n| n.to_os_string());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            Ok(e) => e.paths.iter().any(|p| {
                let file = p.file_name();
                file == name.as_deref()
                    || file.is_some_and(|f| f.to_string_lossy().starts_with(".."))
            }),
            // An error from the OS watcher: re-read to be safe.
            Err(_) => true,
        };
        if relevant {
            // A full channel already holds a pending reload; dropping this signal loses nothing.
            let _ = tx.try_send(());
        }
    })
    .map_err(|source| WatchError {
        path: folder.clone(),
        source,
    })?;
    watcher
        .watch(&folder, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError {
            path: folder.clone(),
            source,
        })?;

    let mut poll = tokio::time::interval(POLL);
    poll.tick().await;
    let mut seen = stamp(&path);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            _ = rx.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
            }
            // The poll only backs up the watcher: reading and hashing a large catalog every few seconds
            // costs real CPU, so it looks at the file's size and mtime first.
            _ = poll.tick() => {
                if stamp(&path) == seen {
                    continue;
                }
            }
        }
        seen = stamp(&path);
        match read(&path, Some(digest)).await {
            Ok(None) => {}
            Ok(Some(loaded)) => match install(&installer, loaded, &metrics) {
                Ok(installed) => digest = installed,
                Err(e) => {
                    metrics.reload_errors.inc();
                    tracing::warn!(error = %e, "catalog edit rejected; keeping the last good catalog");
                }
            },
            Err(e) => {
                metrics.reload_errors.inc();
                tracing::warn!(error = %e, "catalog edit rejected; keeping the last good catalog");
            }
        }
    }
}

/// Size and modification time of the file `path` leads to (through symlinks, as Kubernetes mounts them).
fn stamp(path: &Path) -> Option<(u64, std::time::SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}
