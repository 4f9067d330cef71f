//! The model cache: `<cache>/<name>/<version>/` appears only complete and verified, with a marker
//! recording every file's size and digest. Downloads go to a temporary sibling that is renamed
//! into place; a lock file next to it serialises pulls that share one cache (a hostPath cache
//! under two pods).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::manifest::CACHE_MARKER;

/// What a verified cache entry holds, written last, as `.kiln-complete.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Marker {
    pub source: String,
    pub files: BTreeMap<String, FileRecord>,
    /// The files are symlinks to the source (file:// --in-place and pvc://), not copies.
    #[serde(default)]
    pub in_place: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    pub size: u64,
    pub sha256: String,
    /// Which file was hashed: `serve` does not hash again, so a file swapped or rewritten
    /// since (a linked source edited in place) must show up as a different identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<FileIdentity>,
}

/// Device, inode and modification time of a file (symlinks followed).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FileIdentity {
    pub dev: u64,
    pub inode: u64,
    pub mtime_ns: i128,
}

impl FileIdentity {
    pub fn of(path: &Path) -> std::io::Result<(u64, FileIdentity)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        let mtime_ns = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
        Ok((m.len(), FileIdentity { dev: m.dev(), inode: m.ino(), mtime_ns }))
    }
}

/// Why a cache entry cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StaleEntry {
    #[error("{dir}: no {CACHE_MARKER}: the model was never pulled completely (run `kiln-model-server pull`)")]
    NoMarker { dir: String },
    #[error("{dir}: unreadable {CACHE_MARKER}: {why}")]
    BadMarker { dir: String, why: String },
    #[error("{dir}: {file} is pinned to sha256 {expected} but the cache holds {actual}")]
    Digest { dir: String, file: String, expected: String, actual: String },
    #[error("{dir}: {file} is pinned by the manifest but was not pulled")]
    Missing { dir: String, file: String },
    #[error("{dir}: {file} should be {expected} bytes but is {actual:?} on disk")]
    Size { dir: String, file: String, expected: u64, actual: Option<u64> },
    #[error("{dir}: {file} was replaced or modified after it was verified; pull again to re-verify it")]
    Changed { dir: String, file: String },
    #[error(
        "{dir}: the files are linked in place but the marker does not bind them; pull again to re-verify"
    )]
    Unbound { dir: String },
    #[error("{dir}: pulled from {recorded}, but the manifest's source is now {wanted}")]
    Source { dir: String, recorded: String, wanted: String },
}

impl Marker {
    pub fn read(dir: &Path) -> Result<Marker, StaleEntry> {
        let shown = dir.display().to_string();
        let text = match std::fs::read_to_string(dir.join(CACHE_MARKER)) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StaleEntry::NoMarker { dir: shown });
            }
            Err(e) => return Err(StaleEntry::BadMarker { dir: shown, why: e.to_string() }),
        };
        serde_json::from_str(&text).map_err(|e| StaleEntry::BadMarker { dir: shown, why: e.to_string() })
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let path = dir.join(CACHE_MARKER);
        std::fs::write(&path, json)?;
        File::open(&path)?.sync_all()
    }
}

/// A cache entry is usable when its marker exists and records `source` (when given), every file
/// the manifest pins has the pinned digest in the marker, and every recorded file is still the
/// file that was hashed: same size and, where recorded, same device, inode and modification
/// time (required for files linked in place, which live outside the cache). Digests are not
/// recomputed here: they were computed while the bytes streamed in.
pub fn check(
    dir: &Path,
    pinned: &BTreeMap<String, String>,
    source: Option<&str>,
) -> Result<Marker, StaleEntry> {
    let marker = Marker::read(dir)?;
    let shown = || dir.display().to_string();
    if let Some(wanted) = source
        && marker.source != wanted
    {
        return Err(StaleEntry::Source {
            dir: shown(),
            recorded: marker.source.clone(),
            wanted: wanted.to_string(),
        });
    }
    for (file, expected) in pinned {
        match marker.files.get(file) {
            None => return Err(StaleEntry::Missing { dir: shown(), file: file.clone() }),
            Some(rec) if &rec.sha256 != expected => {
                return Err(StaleEntry::Digest {
                    dir: shown(),
                    file: file.clone(),
                    expected: expected.clone(),
                    actual: rec.sha256.clone(),
                });
            }
            Some(_) => {}
        }
    }
    for (file, rec) in &marker.files {
        let now = FileIdentity::of(&dir.join(file)).ok();
        let actual = now.map(|(size, _)| size);
        if actual != Some(rec.size) {
            return Err(StaleEntry::Size { dir: shown(), file: file.clone(), expected: rec.size, actual });
        }
        match (rec.identity, now) {
            (Some(recorded), Some((_, current))) if recorded != current => {
                return Err(StaleEntry::Changed { dir: shown(), file: file.clone() });
            }
            (None, _) if marker.in_place => return Err(StaleEntry::Unbound { dir: shown() }),
            _ => {}
        }
    }
    Ok(marker)
}

/// A download directory that is removed unless it was committed, whatever fails on the way
/// (a file, the marker, the rename).
pub struct PartialDir {
    path: PathBuf,
    committed: bool,
}

impl PartialDir {
    pub fn create(path: &Path) -> std::io::Result<PartialDir> {
        if path.exists() {
            std::fs::remove_dir_all(path)?;
        }
        std::fs::create_dir_all(path)?;
        Ok(PartialDir { path: path.to_path_buf(), committed: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// It was renamed into place: nothing to remove.
    pub fn committed(mut self) {
        self.committed = true;
    }
}

impl Drop for PartialDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// An exclusive lock on one cache entry, held for the whole pull; released on drop.
pub struct EntryLock {
    _file: File,
}

/// The lock file, the temporary download directory, and the final directory of one entry.
#[derive(Clone)]
pub struct EntryPaths {
    pub lock: PathBuf,
    pub partial: PathBuf,
    pub dest: PathBuf,
}

impl EntryPaths {
    pub fn for_dest(dest: &Path) -> std::io::Result<EntryPaths> {
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = dest
            .file_name()
            .ok_or_else(|| std::io::Error::other(format!("{} has no directory name", dest.display())))?
            .to_string_lossy()
            .to_string();
        Ok(EntryPaths {
            lock: parent.join(format!(".{name}.lock")),
            partial: parent.join(format!(".{name}.partial-{}", std::process::id())),
            dest: dest.to_path_buf(),
        })
    }

    /// Blocks until no other process (on this node) pulls the same entry. The lock file is
    /// never a symlink: one planted in a shared cache could otherwise make `pull` create or
    /// lock a file anywhere it can write.
    pub fn lock(&self) -> std::io::Result<EntryLock> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(parent) = self.lock.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.lock)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    std::io::Error::other(format!(
                        "{} is a symlink; refusing to follow it",
                        self.lock.display()
                    ))
                } else {
                    e
                }
            })?;
        file.lock()?;
        Ok(EntryLock { _file: file })
    }

    /// Partial and set-aside directories of this entry left by pulls that were killed. Call
    /// with the lock held: then no live pull owns any of them.
    pub fn remove_leftovers(&self) -> std::io::Result<Vec<PathBuf>> {
        let Some(parent) = self.dest.parent().filter(|p| p.is_dir()) else { return Ok(Vec::new()) };
        let name = self.dest.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let prefix = format!(".{name}.partial-");
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(parent)? {
            let entry = entry?;
            let file_name = entry.file_name().to_string_lossy().to_string();
            if file_name.starts_with(&prefix) && entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())?;
                removed.push(entry.path());
            }
        }
        Ok(removed)
    }

    /// Moves the verified download into place. A stale destination (no marker, or one a newer
    /// manifest no longer accepts) is moved aside first, then removed.
    pub fn commit(&self) -> std::io::Result<()> {
        if self.dest.exists() {
            let aside = self.partial.with_extension("stale");
            std::fs::rename(&self.dest, &aside)?;
            std::fs::remove_dir_all(&aside)?;
        }
        std::fs::rename(&self.partial, &self.dest)?;
        if let Some(parent) = self.dest.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dir: &Path, files: &[(&str, &[u8])]) -> Marker {
        std::fs::create_dir_all(dir).unwrap();
        let mut marker = Marker { source: "file:///x/".into(), files: BTreeMap::new(), in_place: false };
        for (name, body) in files {
            std::fs::write(dir.join(name), body).unwrap();
            let digest = crate::pull::sha256_hex(body);
            let identity = FileIdentity::of(&dir.join(name)).ok().map(|(_, id)| id);
            marker
                .files
                .insert(name.to_string(), FileRecord { size: body.len() as u64, sha256: digest, identity });
        }
        marker.write(dir).unwrap();
        marker
    }

    #[test]
    fn a_complete_entry_passes_and_a_tampered_one_is_named() {
        let tmp = tempdir();
        let dir = tmp.path().join("m/v1");
        let marker = entry(&dir, &[("config.json", b"{}"), ("model.safetensors", b"weights")]);
        let pinned: BTreeMap<_, _> =
            [("config.json".to_string(), marker.files["config.json"].sha256.clone())].into();
        assert_eq!(check(&dir, &pinned, None).unwrap(), marker);

        let wrong: BTreeMap<_, _> = [("config.json".to_string(), "0".repeat(64))].into();
        assert!(matches!(check(&dir, &wrong, None), Err(StaleEntry::Digest { .. })));

        let absent: BTreeMap<_, _> = [("tokenizer.json".to_string(), "0".repeat(64))].into();
        assert!(matches!(check(&dir, &absent, None), Err(StaleEntry::Missing { .. })));

        std::fs::write(dir.join("model.safetensors"), b"short").unwrap();
        let err = check(&dir, &pinned, None).unwrap_err();
        assert!(matches!(err, StaleEntry::Size { expected: 7, actual: Some(5), .. }), "{err}");

        std::fs::remove_file(dir.join(CACHE_MARKER)).unwrap();
        assert!(matches!(check(&dir, &pinned, None), Err(StaleEntry::NoMarker { .. })));
    }

    #[test]
    fn commit_replaces_a_stale_destination() {
        let tmp = tempdir();
        let paths = EntryPaths::for_dest(&tmp.path().join("m/v1")).unwrap();
        std::fs::create_dir_all(&paths.dest).unwrap();
        std::fs::write(paths.dest.join("junk"), b"half").unwrap();
        entry(&paths.partial, &[("config.json", b"{}")]);
        let _lock = paths.lock().unwrap();
        paths.commit().unwrap();
        assert!(!paths.dest.join("junk").exists());
        assert!(check(&paths.dest, &BTreeMap::new(), None).is_ok());
        assert!(!paths.partial.exists());
    }

    #[test]
    fn a_file_rewritten_after_verification_or_another_source_is_refused() {
        let tmp = tempdir();
        let dir = tmp.path().join("m/v1");
        entry(&dir, &[("model.safetensors", b"weights")]);
        let none = BTreeMap::new();
        assert!(check(&dir, &none, Some("file:///x/")).is_ok());
        let err = check(&dir, &none, Some("s3://other/x/")).unwrap_err();
        assert!(matches!(err, StaleEntry::Source { .. }), "{err}");
        // Same size, new bytes: only the identity tells.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.join("model.safetensors"), b"WEIGHTS").unwrap();
        let err = check(&dir, &none, None).unwrap_err();
        assert!(matches!(&err, StaleEntry::Changed { file, .. } if file == "model.safetensors"), "{err}");
    }

    #[test]
    fn an_in_place_marker_without_identities_must_be_verified_again() {
        let tmp = tempdir();
        let dir = tmp.path().join("m/v1");
        let mut marker = entry(&dir, &[("config.json", b"{}")]);
        marker.in_place = true;
        marker.files.values_mut().for_each(|f| f.identity = None);
        marker.write(&dir).unwrap();
        assert!(matches!(check(&dir, &BTreeMap::new(), None), Err(StaleEntry::Unbound { .. })));
    }

    #[test]
    fn the_lock_file_is_never_followed_through_a_symlink() {
        let tmp = tempdir();
        let paths = EntryPaths::for_dest(&tmp.path().join("m/v1")).unwrap();
        std::fs::create_dir_all(tmp.path().join("m")).unwrap();
        let victim = tmp.path().join("victim");
        std::os::unix::fs::symlink(&victim, &paths.lock).unwrap();
        let err = paths.lock().err().expect("a symlinked lock is refused");
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(!victim.exists(), "nothing was created through the link");
    }

    #[test]
    fn leftovers_of_killed_pulls_are_removed_and_an_uncommitted_download_too() {
        let tmp = tempdir();
        let paths = EntryPaths::for_dest(&tmp.path().join("m/v1")).unwrap();
        let parent = tmp.path().join("m");
        for leftover in [".v1.partial-12345", ".v1.partial-12345.stale"] {
            std::fs::create_dir_all(parent.join(leftover).join("sub")).unwrap();
        }
        std::fs::create_dir_all(parent.join(".v2.partial-1")).unwrap();
        let _lock = paths.lock().unwrap();
        assert_eq!(paths.remove_leftovers().unwrap().len(), 2);
        assert!(
            !parent.join(".v1.partial-12345").exists() && !parent.join(".v1.partial-12345.stale").exists()
        );
        assert!(parent.join(".v2.partial-1").exists(), "another entry's directory is not ours");
        // A download that fails before its commit leaves nothing behind.
        let partial = PartialDir::create(&paths.partial).unwrap();
        std::fs::write(partial.path().join("half"), b"x").unwrap();
        drop(partial);
        assert!(!paths.partial.exists());
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::Builder::new().prefix("kiln-cache-test-").tempdir().unwrap()
    }
}
