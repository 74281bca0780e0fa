//! Free space on the filesystems a run writes to (issue 12): what each write needs is summed
//! per filesystem (by device number, so an output and a scratch directory on one disk are
//! counted together) and compared with what `statvfs` says is free for this user, before any
//! tensor byte is read. A path that does not exist yet is measured at its nearest existing
//! ancestor, where it will be created.

use std::path::{Path, PathBuf};

use crate::formats::FormatError;

/// Bytes a run will write under one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceNeed {
    /// What is written there (`output`, `scratch`), for messages.
    pub role: &'static str,
    /// The file or directory written (it need not exist yet).
    pub path: PathBuf,
    /// Bytes written there, at most at once.
    pub bytes: u64,
}

/// One filesystem's free space against what the run writes to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesystemSpace {
    /// What is written there, in the order first needed, without repeats.
    pub roles: Vec<&'static str>,
    /// The first path written there, as given.
    pub path: PathBuf,
    /// Bytes the run writes there (the needs on it summed).
    pub needed: u64,
    /// Bytes free there for this user; `None` when the filesystem could not be asked.
    pub available: Option<u64>,
}

impl FilesystemSpace {
    /// Whether the free space is known to be short.
    pub fn is_short(&self) -> bool {
        self.available.is_some_and(|free| free < self.needed)
    }
}

/// The nearest existing ancestor of `path` (itself if it exists; `.` for a relative path none
/// of whose ancestors exist).
fn nearest_existing(path: &Path) -> PathBuf {
    path.ancestors()
        .map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p })
        .find(|p| p.exists())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// The device number of the filesystem holding `path` and its free bytes for this user.
fn free_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let existing = nearest_existing(path);
    let device = std::fs::metadata(&existing).ok()?.dev();
    let c_path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs only writes the struct it is given and reads the NUL-terminated path,
    // both valid for the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    // `f_bavail`: the blocks an unprivileged writer may use (root's reserve excluded). The
    // fields are narrower than u64 on some systems.
    #[allow(clippy::useless_conversion)]
    let free = u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize));
    Some((device, free))
}

/// The needs summed per filesystem, in the order each filesystem is first needed; needs of no
/// bytes are left out. A filesystem that cannot be asked is reported with unknown free space
/// (each such path on its own).
pub fn survey(needs: &[SpaceNeed]) -> Vec<FilesystemSpace> {
    let mut found: Vec<(Option<u64>, FilesystemSpace)> = Vec::new();
    for need in needs.iter().filter(|n| n.bytes > 0) {
        let measured = free_space(&need.path);
        let device = measured.map(|(device, _)| device);
        match found.iter_mut().find(|(d, _)| device.is_some() && *d == device) {
            Some((_, fs)) => {
                fs.needed = fs.needed.saturating_add(need.bytes);
                if !fs.roles.contains(&need.role) {
                    fs.roles.push(need.role);
                }
            }
            None => found.push((
                device,
                FilesystemSpace {
                    roles: vec![need.role],
                    path: need.path.clone(),
                    needed: need.bytes,
                    available: measured.map(|(_, free)| free),
                },
            )),
        }
    }
    found.into_iter().map(|(_, fs)| fs).collect()
}

/// [`FormatError::NoSpace`] for the first filesystem of `filesystems` whose free space is
/// known to be short.
pub fn require(filesystems: &[FilesystemSpace]) -> Result<(), FormatError> {
    match filesystems.iter().find(|fs| fs.is_short()) {
        Some(fs) => Err(FormatError::NoSpace {
            path: fs.path.clone(),
            needed: fs.needed,
            available: fs.available.unwrap_or(0),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_on_one_filesystem_are_summed_and_missing_paths_measured_at_their_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let needs = [
            SpaceNeed {
                role: "output",
                path: dir.path().join("not/yet/there.safetensors"),
                bytes: 10,
            },
            SpaceNeed {
                role: "scratch",
                path: dir.path().to_path_buf(),
                bytes: 5,
            },
            SpaceNeed {
                role: "output",
                path: dir.path().join("nothing"),
                bytes: 0,
            },
        ];
        let found = survey(&needs);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].roles, vec!["output", "scratch"]);
        assert_eq!(found[0].needed, 15);
        assert_eq!(found[0].path, needs[0].path);
        assert!(found[0].available.is_some_and(|free| free > 0));
        assert!(!found[0].is_short());
        assert!(require(&found).is_ok());
    }

    #[test]
    fn a_short_filesystem_is_refused_naming_the_path_and_the_bytes() {
        let short = FilesystemSpace {
            roles: vec!["output"],
            path: PathBuf::from("/data/out"),
            needed: 3 << 30,
            available: Some(1 << 30),
        };
        let unknown = FilesystemSpace {
            available: None,
            ..short.clone()
        };
        assert!(require(std::slice::from_ref(&unknown)).is_ok());
        let err = require(&[unknown, short]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/data/out"), "{text}");
        assert!(text.contains("3221225472 bytes (3.00 GiB)"), "{text}");
        assert!(text.contains("1073741824 bytes (1.00 GiB)"), "{text}");
        assert!(text.contains("--no-space-check"), "{text}");
    }
}
