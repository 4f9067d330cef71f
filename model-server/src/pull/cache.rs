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

/// A cache entry is usable when its marker exists, every file the manifest pins has the pinned
/// digest in the marker, and every recorded file has its recorded size. Digests are not
/// recomputed here: they were computed while the bytes streamed in, and the entry is read-only
/// once renamed into place.
pub fn check(dir: &Path, pinned: &BTreeMap<String, String>) -> Result<Marker, StaleEntry> {
    let marker = Marker::read(dir)?;
    let shown = || dir.display().to_string();
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
        let actual = std::fs::metadata(dir.join(file)).ok().map(|m| m.len());
        if actual != Some(rec.size) {
            return Err(StaleEntry::Size { dir: shown(), file: file.clone(), expected: rec.size, actual });
        }
    }
    Ok(marker)
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

    /// Blocks until no other process (on this node) pulls the same entry.
    pub fn lock(&self) -> std::io::Result<EntryLock> {
        if let Some(parent) = self.lock.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = File::options().create(true).truncate(false).write(true).open(&self.lock)?;
        file.lock()?;
        Ok(EntryLock { _file: file })
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
            marker.files.insert(name.to_string(), FileRecord { size: body.len() as u64, sha256: digest });
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
        assert_eq!(check(&dir, &pinned).unwrap(), marker);

        let wrong: BTreeMap<_, _> = [("config.json".to_string(), "0".repeat(64))].into();
        assert!(matches!(check(&dir, &wrong), Err(StaleEntry::Digest { .. })));

        let absent: BTreeMap<_, _> = [("tokenizer.json".to_string(), "0".repeat(64))].into();
        assert!(matches!(check(&dir, &absent), Err(StaleEntry::Missing { .. })));

        std::fs::write(dir.join("model.safetensors"), b"short").unwrap();
        let err = check(&dir, &pinned).unwrap_err();
        assert!(matches!(err, StaleEntry::Size { expected: 7, actual: Some(5), .. }), "{err}");

        std::fs::remove_file(dir.join(CACHE_MARKER)).unwrap();
        assert!(matches!(check(&dir, &pinned), Err(StaleEntry::NoMarker { .. })));
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
        assert!(check(&paths.dest, &BTreeMap::new()).is_ok());
        assert!(!paths.partial.exists());
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::Builder::new().prefix("kiln-cache-test-").tempdir().unwrap()
    }
}
