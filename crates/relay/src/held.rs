//! `held.json` in the spool directory: the ids of the messages an operator put on hold
//! (`tsubame queue hold`), so that a hold outlasts a restart. Not part of the spool
//! proper (spool-format/README.md lists it): the spool never reads it, and losing it
//! only releases the holds.
//!
//! `{"held":["0000000000000001", ...]}`, mode 0600, replaced atomically
//! (`private_file::replace`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's name in the spool directory.
pub const FILE_NAME: &str = "held.json";

/// Largest file read: a million held ids are about 20 MB.
const FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;

#[derive(Debug, Default, Serialize, Deserialize)]
struct HeldFile {
    held: Vec<String>,
}

pub(crate) fn path_in(spool_directory: &Path) -> PathBuf {
    spool_directory.join(FILE_NAME)
}

/// The ids in the file; none when it does not exist.
pub(crate) fn load(path: &Path) -> Result<Vec<String>, String> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error.to_string()),
    };
    if metadata.len() > FILE_BYTES_MAX {
        return Err(format!("larger than {FILE_BYTES_MAX} bytes"));
    }
    let text = std::fs::read_to_string(path).map_err(|error| error.to_string())?;
    let file: HeldFile = serde_json::from_str(&text).map_err(|error| error.to_string())?;
    Ok(file.held)
}

/// Replaces the file with `ids` (removes it when there are none).
pub(crate) fn save(path: &Path, ids: &[String]) -> std::io::Result<()> {
    if ids.is_empty() {
        return match std::fs::remove_file(path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        };
    }
    let text =
        serde_json::to_string(&HeldFile { held: ids.to_vec() }).map_err(std::io::Error::other)?;
    crate::private_file::replace(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn saved_ids_load_back_and_an_empty_set_removes_the_file() {
        let directory = tempfile::tempdir().unwrap();
        let path = path_in(directory.path());
        assert_eq!(load(&path).unwrap(), Vec::<String>::new());
        let ids = vec![
            "0000000000000001".to_string(),
            "00000000000000ff".to_string(),
        ];
        save(&path, &ids).unwrap();
        assert_eq!(load(&path).unwrap(), ids);
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        save(&path, &[]).unwrap();
        assert!(!path.exists());
        std::fs::write(&path, "not json").unwrap();
        assert!(load(&path).is_err());
    }
}
