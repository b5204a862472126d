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

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
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

/// A directory whose new entries must reach the disk: the names seen at its last listing.
struct Watched {
    path: PathBuf,
    handle: File,
    known: HashSet<OsString>,
    mtime: Option<SystemTime>,
    /// Sync the new entries' files too (blob files), not only the directory.
    files: bool,
}

impl Watched {
    fn open(path: PathBuf, files: bool, counts: &SyncCounts) -> io::Result<Watched> {
        let handle = File::open(&path).map_err(|e| at(&path, e))?;
        let mut w = Watched {
            path,
            handle,
            known: HashSet::new(),
            mtime: None,
            files,
        };
        // Whatever an earlier process left unsynced is synced before anything builds on it.
        w.sync_new(true, counts)?;
        Ok(w)
    }

    /// Lists the directory when it may have changed; syncs the files new since the last
    /// listing (when `files`) and then the directory itself.
    fn sync_new(&mut self, force: bool, counts: &SyncCounts) -> io::Result<()> {
        let mtime = self.handle.metadata().and_then(|m| m.modified()).map_err(|e| at(&self.path, e))?;
        let recent = SystemTime::now()
            .duration_since(mtime)
            .map_or(true, |age| age < COARSE_CLOCK_MARGIN);
        if !force && !recent && self.mtime == Some(mtime) {
            return Ok(());
        }
        self.mtime = Some(mtime);
        let mut seen = HashSet::with_capacity(self.known.len());
        let mut new = Vec::new();
        for entry in std::fs::read_dir(&self.path).map_err(|e| at(&self.path, e))? {
            let name = entry.map_err(|e| at(&self.path, e))?.file_name();
            if !self.known.contains(&name) {
                new.push(name.clone());
            }
            seen.insert(name);
        }
        if new.is_empty() && !force {
            self.known = seen;
            return Ok(());
        }
        if self.files {
            for name in &new {
                let path = self.path.join(name);
                match File::open(&path) {
                    Ok(f) => {
                        f.sync_data().map_err(|e| at(&path, e))?;
                        counts.files.fetch_add(1, Ordering::Relaxed);
                    }
                    // sled removed it meanwhile (a blob replaced by a newer page).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(at(&path, e)),
                }
            }
        }
        self.handle.sync_all().map_err(|e| at(&self.path, e))?;
        counts.files.fetch_add(1, Ordering::Relaxed);
        self.known = seen;
        Ok(())
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
    /// then the log, then the database directory if its entries changed (a snapshot renamed).
    pub(super) fn commit(&mut self) -> io::Result<()> {
        self.blobs.sync_new(false, &self.counts)?;
        self.log.sync_data().map_err(|e| at(&self.log_path, e))?;
        self.counts.files.fetch_add(1, Ordering::Relaxed);
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

    #[test]
    fn a_new_file_is_synced_once_and_the_directory_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let counts = SyncCounts::default();
        let mut w = Watched::open(dir.path().to_owned(), true, &counts).unwrap();
        assert_eq!(counts.get(), (0, 1), "the empty directory itself at open");
        std::fs::write(dir.path().join("a"), b"x").unwrap();
        w.sync_new(false, &counts).unwrap();
        assert_eq!(counts.get(), (0, 3), "file a, then the directory");
        // Nothing new: a listing at most (the time is recent), no sync.
        w.sync_new(false, &counts).unwrap();
        assert_eq!(counts.get(), (0, 3));
        std::fs::remove_file(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("b"), b"y").unwrap();
        w.sync_new(false, &counts).unwrap();
        assert_eq!(counts.get(), (0, 5), "file b, then the directory");
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
        std::fs::write(db.join(BLOBS_DIR).join("42"), b"blob").unwrap();
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
