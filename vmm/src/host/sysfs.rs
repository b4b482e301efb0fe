//! Reading and writing one-value setting files (sysfs, procfs, tracefs), and a guard that
//! restores a file's original value when dropped.

use std::path::{Path, PathBuf};

use super::{root_hint, HostError};

/// The trimmed contents of a setting file.
pub fn read(path: impl AsRef<Path>) -> Result<String, HostError> {
    let path = path.as_ref();
    std::fs::read_to_string(path).map(|t| t.trim().to_string()).map_err(|source| HostError::Read {
        path: path.to_path_buf(),
        hint: root_hint(&source),
        source,
    })
}

/// A setting file read as a number.
pub fn read_u64(path: impl AsRef<Path>) -> Result<u64, HostError> {
    let path = path.as_ref();
    let text = read(path)?;
    text.parse().map_err(|_| HostError::Read {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("'{text}' is not a number")),
        hint: "",
    })
}

/// Writes `value` to a setting file.
pub fn write(path: impl AsRef<Path>, value: &str) -> Result<(), HostError> {
    let path = path.as_ref();
    std::fs::write(path, value).map_err(|source| HostError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        hint: root_hint(&source),
        source,
    })
}

/// Creates the directory `path` in a pseudo filesystem (a cgroup, a trace instance).
pub fn create_dir(path: impl AsRef<Path>) -> Result<(), HostError> {
    let path = path.as_ref();
    std::fs::create_dir(path).map_err(|source| HostError::Write {
        path: path.to_path_buf(),
        value: "(mkdir)".into(),
        hint: root_hint(&source),
        source,
    })
}

/// A setting changed for the guard's life: the original value is written back on drop.
#[derive(Debug)]
pub struct SettingGuard {
    path: PathBuf,
    original: String,
}

impl SettingGuard {
    /// Saves the file's value, then writes `value`.
    pub fn set(path: impl AsRef<Path>, value: &str) -> Result<Self, HostError> {
        let path = path.as_ref().to_path_buf();
        let original = read(&path)?;
        write(&path, value)?;
        Ok(SettingGuard { path, original })
    }

    /// The value the file had before.
    pub fn original(&self) -> &str {
        &self.original
    }
}

impl Drop for SettingGuard {
    fn drop(&mut self) {
        if let Err(e) = write(&self.path, &self.original) {
            tracing::warn!("could not restore {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_puts_the_original_back_also_when_unwinding() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("setting");
        std::fs::write(&file, "5\n").unwrap();
        {
            let guard = SettingGuard::set(&file, "100").unwrap();
            assert_eq!(guard.original(), "5");
            assert_eq!(read_u64(&file).unwrap(), 100);
        }
        assert_eq!(read(&file).unwrap(), "5");
        let path = file.clone();
        let result = std::panic::catch_unwind(move || {
            let _guard = SettingGuard::set(&path, "7").unwrap();
            panic!("a failing test");
        });
        assert!(result.is_err());
        assert_eq!(read(&file).unwrap(), "5");
        let err = read_u64(dir.path().join("missing")).unwrap_err().to_string();
        assert!(err.contains("cannot read") && err.contains("missing"), "{err}");
    }
}
