//! Small file-system helpers: the process umask, private data directories, atomic replacement.
//! The only module that knows rustix.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Makes everything this process creates from now on private to its user (umask 0077), so
/// that a daemon started under `umask 000` (Docker, a shell) creates no world-writable
/// database files, and the admin socket is private from the moment it is bound.
pub fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// The effective user id of this process.
pub fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// What [`prepare_private_dir`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirState {
    /// Created, mode 0700.
    Created,
    /// Existed, private already.
    Private,
    /// Existed with this mode, open to other users; now 0700.
    Tightened {
        /// The mode it had.
        from: u32,
    },
}

/// Why a directory cannot be made private.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// Reading, creating or changing it failed.
    #[error("cannot use the data directory {dir}: {error}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
    /// Something other than a directory is there.
    #[error("the data directory {0} exists and is not a directory")]
    NotDirectory(PathBuf),
    /// Other users can reach it and it is not this user's to change.
    #[error(
        "the data directory {dir} is open to other users (mode {mode:04o}, owner uid {owner}) and is not this user's (uid {me}) to make private; fix: `chown {me} {dir} && chmod 700 {dir}`, or set --data-dir to a directory relay creates itself, e.g. {dir}/relay",
        dir = dir.display()
    )]
    NotOwned {
        /// The directory.
        dir: PathBuf,
        /// Its mode.
        mode: u32,
        /// Its owner.
        owner: u32,
        /// This process's user.
        me: u32,
    },
    /// A shared directory such as /tmp (sticky bit): making it private would break others.
    #[error(
        "the data directory {dir} is a shared directory (mode {mode:04o}, sticky bit); fix: set --data-dir to a directory of relay's own, e.g. {dir}/relay",
        dir = dir.display()
    )]
    Shared {
        /// The directory.
        dir: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

/// Makes `dir` a directory only its owner can use: creates it (and parents) mode 0700, or
/// tightens an existing one this user owns to 0700. Refuses one that other users can read or
/// write and that is not this user's to change, or a shared one (sticky bit, like /tmp).
pub fn prepare_private_dir(dir: &Path) -> Result<DirState, DirError> {
    let io = |error| DirError::Io {
        dir: dir.to_owned(),
        error,
    };
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
            return Ok(DirState::Created);
        }
        Err(e) => return Err(io(e)),
    };
    if !meta.is_dir() {
        return Err(DirError::NotDirectory(dir.to_owned()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(DirState::Private);
    }
    if mode & 0o1000 != 0 {
        return Err(DirError::Shared {
            dir: dir.to_owned(),
            mode,
        });
    }
    let me = effective_uid();
    if meta.uid() != me {
        return Err(DirError::NotOwned {
            dir: dir.to_owned(),
            mode,
            owner: meta.uid(),
            me,
        });
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    Ok(DirState::Tightened { from: mode })
}

/// Creates `dir` (and parents) readable by the owner alone; one that exists is left as it is
/// (for directories inside a data directory that [`prepare_private_dir`] made private).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Writes `data` to `path` atomically (temporary file, fsync, rename), mode 0600.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_with_mode(path, data, 0o600)
}

/// Writes `data` to `path` atomically, mode 0644.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_with_mode(path, data, 0o644)
}

fn write_with_mode(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // A fresh, unique temporary name beside the target (same file system, so the rename is
    // atomic); two files written at once (a key and its certificate) never share one.
    let mut tmp = tempfile::Builder::new()
        .prefix(".relay-")
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(parent)?;
    // The umask narrows the mode given at creation; the mode asked for is exact.
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_missing_directory_is_created_private() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        assert_eq!(prepare_private_dir(&dir).unwrap(), DirState::Created);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(prepare_private_dir(&dir).unwrap(), DirState::Private);
    }

    #[test]
    fn an_own_readable_directory_is_tightened() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(prepare_private_dir(&dir).unwrap(), DirState::Tightened { from: 0o755 });
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn a_shared_directory_is_refused_with_a_fix() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("tmp");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let err = prepare_private_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("sticky") && err.contains("--data-dir"), "{err}");
        assert_eq!(mode(&dir), 0o1777, "left alone");
    }

    #[test]
    fn another_users_open_directory_is_refused_with_a_fix() {
        if effective_uid() != 0 {
            // Past the harness's capture of `eprintln!`, so a passing run shows the skip.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED another_users_open_directory_is_refused_with_a_fix: needs root to chown"
            );
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("theirs");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let err = prepare_private_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("mode 0755") && err.contains("chown 0") && err.contains("chmod 700"),
            "{err}"
        );
        assert_eq!(mode(&dir), 0o755, "left alone");
    }

    #[test]
    fn atomic_writes_in_one_directory_use_distinct_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        // node.key and node.crt once shared `node.tmp`.
        let (key, crt) = (dir.path().join("node.key"), dir.path().join("node.crt"));
        std::thread::scope(|s| {
            for _ in 0..20 {
                s.spawn(|| write_private(&key, &[b'k'; 4096]).unwrap());
                s.spawn(|| write_atomic(&crt, &[b'c'; 4096]).unwrap());
            }
        });
        assert_eq!(std::fs::read(&key).unwrap(), vec![b'k'; 4096]);
        assert_eq!(std::fs::read(&crt).unwrap(), vec![b'c'; 4096]);
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&crt), 0o644);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
    }
}
