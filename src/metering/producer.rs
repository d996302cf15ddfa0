//! The spool folder's own producer id, for when the config names none.
//!
//! Outbox row ids (Stripe `identifier`s) hash the producer, so two spools sealing the same window for the same
//! customer must have different producers, or Stripe takes the second one's row for a duplicate and its usage
//! is lost. A name from the environment (HOSTNAME) is not unique outside Kubernetes and not stable inside it
//! (a pod restarted by a Deployment keeps its volume under a new name), so the id is random, created once per
//! folder and kept in `<dir>/PRODUCER`: unique per spool by construction, stable across restarts.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::Path;

use rand::RngCore;

use super::spool::{SpoolError, sync_dir};

/// The file, in the metering folder.
const FILE: &str = "PRODUCER";
/// Random bytes in an id (written as twice as many lowercase hex digits).
const ID_BYTES: usize = 16;

/// The producer id of the spool folder `dir`, creating it on first use. The caller holds the folder lock.
pub(crate) fn spool_producer(dir: &Path) -> Result<String, SpoolError> {
    let path = dir.join(FILE);
    let io = |source| SpoolError::Io {
        path: path.clone(),
        source,
    };
    match fs::read_to_string(&path) {
        Ok(text) if is_id(text.trim_end()) => return Ok(text.trim_end().to_owned()),
        Ok(text) => {
            // Only a crash between creating the file and its fsync leaves it unreadable, and no row was
            // sealed with an id that never became durable, so a new one cannot clash with anything sent.
            tracing::warn!(
                file = %path.display(),
                bytes = text.len(),
                "the metering producer id file is not a producer id; replacing it"
            );
            fs::remove_file(&path).map_err(io)?;
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) if e.kind() == ErrorKind::InvalidData => {
            tracing::warn!(file = %path.display(), "the metering producer id file is not text; replacing it");
            fs::remove_file(&path).map_err(io)?;
        }
        Err(e) => return Err(io(e)),
    }
    let mut bytes = [0u8; ID_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io)?;
    file.write_all(format!("{}\n", hex::encode(bytes)).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io)?;
    sync_dir(dir)?;
    // Read back, so the id in use is the one a restart will find.
    let text = fs::read_to_string(&path).map_err(io)?;
    let id = text.trim_end();
    if !is_id(id) {
        return Err(io(std::io::Error::new(
            ErrorKind::InvalidData,
            "the producer id just written reads back differently",
        )));
    }
    tracing::info!(producer = id, file = %path.display(), "created the metering producer id of this spool");
    Ok(id.to_owned())
}

fn is_id(text: &str) -> bool {
    text.len() == ID_BYTES * 2
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_random_id_per_folder_stable_across_opens() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let first = spool_producer(a.path()).unwrap();
        assert!(is_id(&first), "{first}");
        assert_eq!(
            spool_producer(a.path()).unwrap(),
            first,
            "read back, not new"
        );
        assert_eq!(
            fs::read_to_string(a.path().join(FILE)).unwrap(),
            format!("{first}\n")
        );
        assert_ne!(spool_producer(b.path()).unwrap(), first);
    }

    #[test]
    fn a_torn_id_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        for torn in [&b""[..], b"0123abc", b"\xff\xfe"] {
            fs::write(dir.path().join(FILE), torn).unwrap();
            let id = spool_producer(dir.path()).unwrap();
            assert!(is_id(&id), "{id}");
            assert_eq!(spool_producer(dir.path()).unwrap(), id);
            fs::remove_file(dir.path().join(FILE)).unwrap();
        }
    }
}
