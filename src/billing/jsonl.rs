//! Small durable JSON-lines files: appended under an exclusive file lock with one write and an fsync, read
//! back ignoring a torn last line. The server appends to them while `tollgate billing …` commands read (and
//! `requeue` appends) from another process, so every writer locks and every reader tolerates a partial tail.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use fs4::fs_std::FileExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::BillingError;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BillingError + '_ {
    move |source| BillingError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Appends `items` as lines, durably (one write, one fsync) under an exclusive lock. After a torn last line
/// (a crashed append) the new lines start on a line of their own, so the fragment cannot swallow them.
pub(crate) fn append<T: Serialize>(path: &Path, items: &[T]) -> Result<(), BillingError> {
    if items.is_empty() {
        return Ok(());
    }
    let mut out = encode(path, items)?;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    file.lock_exclusive().map_err(io(path))?;
    let written = ends_mid_line(&mut file)
        .and_then(|torn| {
            if torn {
                // The fragment is kept (as a line `read` skips with a warning) rather than cut off: it may be
                // a whole record someone appended by hand without a newline.
                out.insert(0, b'\n');
            }
            file.write_all(&out)
        })
        .and_then(|()| file.sync_data())
        .map_err(io(path));
    let unlocked = FileExt::unlock(&file).map_err(io(path));
    written.and(unlocked)
}

/// Whether the file is non-empty and its last byte is not a newline.
fn ends_mid_line(file: &mut File) -> std::io::Result<bool> {
    if file.metadata()?.len() == 0 {
        return Ok(false);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8];
    file.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

/// Every complete line of `path` that parses (a missing file is empty); the byte length read is returned too.
pub(crate) fn read<T: DeserializeOwned>(path: &Path) -> Result<(Vec<T>, u64), BillingError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(io(path)(e)),
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut out = Vec::new();
    for line in bytes[..complete].split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice(line) {
            Ok(item) => out.push(item),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "skipping an unreadable line")
            }
        }
    }
    Ok((out, bytes.len() as u64))
}

/// `items` as JSON lines, each ending with a newline.
fn encode<T: Serialize>(path: &Path, items: &[T]) -> Result<Vec<u8>, BillingError> {
    let mut out = Vec::new();
    for item in items {
        serde_json::to_writer(&mut out, item).map_err(|e| BillingError::Json {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        out.push(b'\n');
    }
    Ok(out)
}

/// The file's length now (0 when missing): cheap change detection for files another process appends to.
pub(crate) fn len(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

/// Replaces the file with `items` atomically (temporary file, fsync, rename, fsync of the folder).
pub(crate) fn rewrite<T: Serialize>(path: &Path, items: &[T]) -> Result<(), BillingError> {
    let tmp = path.with_extension("rewrite");
    let out = encode(path, items)?;
    let mut file = File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(&out)
        .and_then(|()| file.sync_all())
        .map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_append_after_a_torn_line_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        append(&path, &[vec![1u32]]).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"[2,").unwrap();
        drop(f);
        append(&path, &[vec![3u32], vec![4]]).unwrap();
        assert_eq!(
            read::<Vec<u32>>(&path).unwrap().0,
            [vec![1], vec![3], vec![4]]
        );
        append(&path, &[vec![5u32]]).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, "[1]\n[2,\n[3]\n[4]\n[5]\n");
    }

    #[test]
    fn append_read_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/x.jsonl");
        append(&path, &[1u32, 2]).unwrap();
        append(&path, &[3u32]).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"4").unwrap();
        let (items, n) = read::<u32>(&path).unwrap();
        assert_eq!(items, [1, 2, 3]);
        assert_eq!(n, len(&path));
        drop(f);
        append(&path, &[5u32]).unwrap();
        assert_eq!(
            read::<u32>(&path).unwrap().0,
            [1, 2, 3, 4, 5],
            "no merged \"45\""
        );
        rewrite(&path, &[9u32]).unwrap();
        assert_eq!(read::<u32>(&path).unwrap().0, [9]);
        assert_eq!(
            read::<u32>(&dir.path().join("none")).unwrap().0,
            Vec::<u32>::new()
        );
    }
}
