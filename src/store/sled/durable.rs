//! What a sled 0.34 flush leaves out, added after each one: a real `fdatasync` of its log, and
//! a sync of the files and directory entries it creates without one, so that a group commit
//! survives a power cut and not only a crash of the process.
//!
//! sled writes its log with `pwrite` + `sync_file_range`, which neither empties the drive's
//! write cache nor records the file's new size; it writes values over its blob threshold
//! (about 128 KiB per page) to files under `blobs/`, and its `conf`, without any sync, and syncs
//! no directory after creating a file or renaming a snapshot. A group commit here is
//! therefore: sled's flush, then every blob file created since the last commit and the
//! `blobs` directory, then one `fdatasync` of the log, then the database directory when its
//! entries changed. Only then is anything acknowledged.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// sled's log file, inside the database directory.
const LOG_FILE: &str = "db";
/// sled's storage parameters, written once when the database is created.
const CONF_FILE: &str = "conf";
/// sled's directory of values too large for a log segment.
const BLOBS_DIR: &str = "blobs";

/// A directory modified this recently is listed again even when its modification time looks
/// unchanged: file systems stamp times with a coarse clock (one scheduler tick), so a file
/// created in the same tick as the previous listing leaves the time as it was.
const COARSE_CLOCK_MARGIN: Duration = Duration::from_secs(2);

/// How many syncs the store made, for `/metrics`.
#[derive(Debug, Default)]
pub struct SyncCounts {
    /// Group commits made durable.
    pub commits: AtomicU64,
    /// `fdatasync`/`fsync` calls they took (the log, new files, directories).
    pub files: AtomicU64,
}

impl SyncCounts {
    /// (group commits, file syncs) so far.
    pub fn get(&self) -> (u64, u64) {
        (self.commits.load(Ordering::Relaxed), self.files.load(Ordering::Relaxed))
    }
}

/// What is known of one entry of a watched directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// On disk: synced complete (a blob), or seen (any other entry).
    Settled,
    /// A blob seen while sled was still writing it, at this length: checked again at every
    /// commit until complete, then synced. The commit that acknowledges what it holds comes
    /// after the write that filled it, so it finds the blob complete.
    Partial(u64),
}

/// A directory whose new entries must reach the disk: the names seen at its last listing.
struct Watched {
    path: PathBuf,
    handle: File,
    known: HashMap<OsString, Entry>,
    mtime: Option<SystemTime>,
    /// Sync the new entries' files too (blob files), not only the directory.
    blobs: bool,
}

impl Watched {
    fn open(path: PathBuf, blobs: bool, counts: &SyncCounts) -> io::Result<Watched> {
        let handle = File::open(&path).map_err(|e| at(&path, e))?;
        let mut w = Watched {
            path,
            handle,
            known: HashMap::new(),
            mtime: None,
            blobs,
        };
        // Whatever an earlier process left unsynced is synced before anything builds on it.
        w.sync_new(true, counts)?;
        Ok(w)
    }

    /// Lists the directory when it may have changed; syncs the blob files that are new or
    /// were incomplete at the last listing, once complete, and then the directory itself if
    /// it has new entries.
    fn sync_new(&mut self, opening: bool, counts: &SyncCounts) -> io::Result<()> {
        self.sync_partial(counts)?;
        let mtime = self
            .handle
            .metadata()
            .and_then(|m| m.modified())
            .map_err(|e| at(&self.path, e))?;
        let recent = SystemTime::now()
            .duration_since(mtime)
            .map_or(true, |age| age < COARSE_CLOCK_MARGIN);
        if !opening && !recent && self.mtime == Some(mtime) {
            return Ok(());
        }
        self.mtime = Some(mtime);
        let mut seen = HashMap::with_capacity(self.known.len());
        let mut new = 0;
        for entry in std::fs::read_dir(&self.path).map_err(|e| at(&self.path, e))? {
            let name = entry.map_err(|e| at(&self.path, e))?.file_name();
            let state = match self.known.get(&name) {
                Some(state) => *state,
                None => {
                    new += 1;
                    if self.blobs {
                        // At open, leftovers of an earlier process are synced as they are.
                        match self.sync_blob(&name, opening, counts)? {
                            Some(state) => state,
                            None => continue,
                        }
                    } else {
                        Entry::Settled
                    }
                }
            };
            seen.insert(name, state);
        }
        self.known = seen;
        // A blob completed since its name was synced needs no second directory sync.
        if new > 0 || opening {
            self.handle.sync_all().map_err(|e| at(&self.path, e))?;
            counts.files.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Checks again the blobs that were incomplete; syncs those now complete.
    fn sync_partial(&mut self, counts: &SyncCounts) -> io::Result<()> {
        let partial: Vec<(OsString, u64)> = self
            .known
            .iter()
            .filter_map(|(name, state)| match state {
                Entry::Partial(len) => Some((name.clone(), *len)),
                Entry::Settled => None,
            })
            .collect();
        for (name, len) in partial {
            let now = match std::fs::metadata(self.path.join(&name)) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.known.remove(&name);
                    continue;
                }
                Err(e) => return Err(at(&self.path.join(&name), e)),
            };
            if now == len {
                continue;
            }
            match self.sync_blob(&name, false, counts)? {
                Some(state) => self.known.insert(name, state),
                None => self.known.remove(&name),
            };
        }
        Ok(())
    }

    /// Syncs blob `name` if it is complete (or `anyway`); `None` if sled removed it meanwhile.
    fn sync_blob(&self, name: &OsString, anyway: bool, counts: &SyncCounts) -> io::Result<Option<Entry>> {
        let path = self.path.join(name);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(at(&path, e)),
        };
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).map_err(|e| at(&path, e))?;
        if !anyway && !blob_complete(&bytes) {
            return Ok(Some(Entry::Partial(bytes.len() as u64)));
        }
        f.sync_data().map_err(|e| at(&path, e))?;
        counts.files.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Entry::Settled))
    }
}

/// Whether a sled blob file is whole: sled writes a CRC-32 (little-endian) of the rest of the
/// file first, then a kind byte and the value, in separate writes.
fn blob_complete(bytes: &[u8]) -> bool {
    match bytes.split_first_chunk::<4>() {
        Some((crc, rest)) if !rest.is_empty() => u32::from_le_bytes(*crc) == crc32fast::hash(rest),
        _ => false,
    }
}

/// The syncs one database needs beyond sled's flush. Owned by the group-commit thread.
pub(super) struct Durable {
    log: File,
    log_path: PathBuf,
    blobs: Watched,
    dir: Watched,
    counts: std::sync::Arc<SyncCounts>,
}

impl Durable {
    /// Makes what sled wrote while opening `dir` durable (its `conf`, a new log, a new
    /// directory and its entry in the data directory), and prepares the per-commit syncs.
    pub(super) fn open(dir: &Path, counts: std::sync::Arc<SyncCounts>) -> io::Result<Durable> {
        let log_path = dir.join(LOG_FILE);
        let log = File::open(&log_path).map_err(|e| at(&log_path, e))?;
        log.sync_data().map_err(|e| at(&log_path, e))?;
        counts.files.fetch_add(1, Ordering::Relaxed);
        let conf = dir.join(CONF_FILE);
        match File::open(&conf) {
            Ok(f) => {
                f.sync_all().map_err(|e| at(&conf, e))?;
                counts.files.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(at(&conf, e)),
        }
        let blobs = Watched::open(dir.join(BLOBS_DIR), true, &counts)?;
        let this = Watched::open(dir.to_owned(), false, &counts)?;
        // The database directory's own entry, in case this open created it.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| at(parent, e))?;
            counts.files.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Durable {
            log,
            log_path,
            blobs,
            dir: this,
            counts,
        })
    }

    /// After sled's flush: new blob files and their directory first (the log points at them),
    /// then the log, then blob files created meanwhile (sled writes a blob as it reserves the
    /// log entry that points at it, on any writer's thread, so one may appear while the log
    /// syncs), then the database directory if its entries changed (a snapshot renamed).
    pub(super) fn commit(&mut self) -> io::Result<()> {
        self.blobs.sync_new(false, &self.counts)?;
        self.log.sync_data().map_err(|e| at(&self.log_path, e))?;
        self.counts.files.fetch_add(1, Ordering::Relaxed);
        self.blobs.sync_new(false, &self.counts)?;
        self.dir.sync_new(false, &self.counts)?;
        self.counts.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A blob file as sled writes it: CRC-32 of the rest, kind byte, value.
    fn blob(value: &[u8]) -> Vec<u8> {
        let mut rest = vec![7u8];
        rest.extend_from_slice(value);
        let mut out = crc32fast::hash(&rest).to_le_bytes().to_vec();
        out.extend_from_slice(&rest);
        out
    }

    #[test]
    fn a_new_blob_is_synced_once_complete_and_the_directory_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let counts = SyncCounts::default();
        let mut w = Watched::open(dir.path().to_owned(), true, &counts).unwrap();
        assert_eq!(counts.get(), (0, 1), "the empty directory itself at open");
        let whole = blob(b"value");
        // Caught while sled writes it: the name is synced in the directory, the file waits.
        std::fs::write(dir.path().join("a"), &whole[..5]).unwrap();
        w.sync_new(false, &counts).unwrap();
        assert_eq!(counts.get(), (0, 2), "the directory only");
        std::fs::write(dir.path().join("a"), &whole).unwrap();
        w.sync_new(false, &counts).unwrap();
        assert_eq!(
            counts.get(),
            (0, 3),
            "file a once complete; its name is on disk already"
        );
        // Nothing new: a listing at most (the time is recent), no sync.
        w.sync_new(false, &counts).unwrap();
        assert_eq!(counts.get(), (0, 3));
        std::fs::remove_file(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("b"), blob(b"other")).unwrap();
        w.sync_new(false, &counts).unwrap();
        assert_eq!(counts.get(), (0, 5), "file b, then the directory");
    }

    #[test]
    fn a_blob_is_complete_only_when_its_checksum_matches() {
        let whole = blob(b"0123456789");
        assert!(blob_complete(&whole));
        for cut in 0..whole.len() {
            assert!(!blob_complete(&whole[..cut]), "cut at {cut}");
        }
    }

    #[test]
    fn a_commit_syncs_the_log_and_new_blobs_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        std::fs::create_dir_all(db.join(BLOBS_DIR)).unwrap();
        std::fs::write(db.join(LOG_FILE), b"log").unwrap();
        std::fs::write(db.join(CONF_FILE), b"conf").unwrap();
        let counts = Arc::new(SyncCounts::default());
        let mut d = Durable::open(&db, counts.clone()).unwrap();
        let (_, at_open) = counts.get();
        d.commit().unwrap();
        assert_eq!(counts.get(), (1, at_open + 1), "the log alone");
        std::fs::write(db.join(BLOBS_DIR).join("42"), blob(b"page")).unwrap();
        d.commit().unwrap();
        assert_eq!(counts.get(), (2, at_open + 4), "blob, blobs directory, log");
    }

    #[test]
    fn a_missing_log_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = Durable::open(dir.path(), Arc::default()).err().unwrap();
        assert!(err.to_string().contains("db"), "{err}");
    }
}
