//! Replacing a small state file so a crash leaves either the old or the new content, never a torn one.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Writes `bytes` to `dir/name`: a temporary file beside it, fsynced, renamed over the old one, and the
/// folder fsynced so the rename itself survives a crash. Returns the path that failed with the error.
pub fn replace_file(
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<(), (std::path::PathBuf, io::Error)> {
    let path = dir.join(name);
    let temporary = dir.join(format!("{name}.tmp"));
    let at = |p: &Path| {
        let p = p.to_owned();
        move |e| (p, e)
    };
    let mut file = File::create(&temporary).map_err(at(&temporary))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(at(&temporary))?;
    drop(file);
    fs::rename(&temporary, &path).map_err(at(&path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_replaced_whole_and_no_temporary_stays() {
        let dir = tempfile::tempdir().unwrap();
        replace_file(dir.path(), "state.json", b"one").unwrap();
        replace_file(dir.path(), "state.json", b"two").unwrap();
        assert_eq!(fs::read(dir.path().join("state.json")).unwrap(), b"two");
        assert!(!dir.path().join("state.json.tmp").exists());
        let missing = dir.path().join("no-such-folder");
        let (path, _) = replace_file(&missing, "state.json", b"x").unwrap_err();
        assert!(path.starts_with(&missing));
    }
}
