//! The refresh token on disk: one line of text in a file only its owner can read.
//!
//! [`store`] creates the parent directory (mode 0700) when it is missing, writes a new
//! mode-0600 file next to the old one, syncs it, renames it over the old one and syncs
//! the directory, so a crash leaves the old token or the new one, never half of one,
//! and the token is never readable by anyone else, not even for a moment. [`load`]
//! reads it back (and warns when the file's mode lets others read it).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Secret, TokenError};

/// Largest token file read: Google's refresh tokens are about 100 bytes; other
/// issuers' (JWTs) can be a few KiB.
pub const TOKEN_FILE_BYTES_MAX: u64 = 16 * 1024;
/// Mode of a token file.
pub const TOKEN_FILE_MODE: u32 = 0o600;
/// Mode of a directory [`store`] creates.
pub const TOKEN_DIRECTORY_MODE: u32 = 0o700;

/// Writes `token` to `path` atomically, mode 0600.
pub fn store(path: &Path, token: &Secret) -> Result<(), TokenError> {
    check_token_text(token.expose())
        .map_err(|why| TokenError::configuration(format!("not storing the token: {why}")))?;
    let failed = |doing: &str, target: &Path, error: io::Error| {
        TokenError::configuration(format!("{doing} {}: {error}", target.display()))
    };
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        TokenError::configuration(format!("{} is not a file name", path.display()))
    })?;
    if !directory.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(TOKEN_DIRECTORY_MODE)
            .create(&directory)
            .map_err(|error| failed("creating", &directory, error))?;
    }

    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(file_name);
    temporary_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    let temporary = directory.join(temporary_name);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(TOKEN_FILE_MODE)
            .open(&temporary)
            .map_err(|error| failed("creating", &temporary, error))?;
        file.write_all(token.expose().as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.sync_all())
            .map_err(|error| failed("writing", &temporary, error))?;
        fs::rename(&temporary, path).map_err(|error| failed("replacing", path, error))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result?;
    File::open(&directory)
        .and_then(|directory| directory.sync_all())
        .map_err(|error| failed("syncing", &directory, error))
}

/// Reads the token [`store`] wrote.
pub fn load(path: &Path) -> Result<Secret, TokenError> {
    let text = read_bounded(path, TOKEN_FILE_BYTES_MAX, "refresh token")?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenError::configuration(format!(
            "refresh token file {} is empty (run `tsubame oauth google authorize`)",
            path.display()
        )));
    }
    check_token_text(token).map_err(|why| {
        TokenError::configuration(format!("refresh token file {}: {why}", path.display()))
    })?;
    Ok(Secret::new(token))
}

/// A token is one line of printable ASCII without spaces (RFC 6749 Appendix A.17
/// allows only VSCHAR, %x20-7E; none has whitespace in practice).
fn check_token_text(token: &str) -> Result<(), &'static str> {
    if token.is_empty() {
        return Err("it is empty");
    }
    if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err("it holds whitespace, control or non-ASCII characters");
    }
    Ok(())
}

/// Reads a small text file whole: at most `bytes_max` bytes, or an error naming the
/// file and `what` it should hold (never its content). Warns when others may read it.
pub(crate) fn read_bounded(path: &Path, bytes_max: u64, what: &str) -> Result<String, TokenError> {
    let failed = |error: io::Error| {
        let hint = if error.kind() == io::ErrorKind::NotFound && what == "refresh token" {
            " (run `tsubame oauth google authorize` to make it)"
        } else {
            ""
        };
        TokenError::configuration(format!("{what} file {}: {error}{hint}", path.display()))
    };
    let file = File::open(path).map_err(failed)?;
    let metadata = file.metadata().map_err(failed)?;
    if metadata.mode() & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            mode = format_args!("{:o}", metadata.mode() & 0o777),
            "{what} file is readable by others than its owner; chmod 600 it"
        );
    }
    let mut bytes = Vec::new();
    file.take(bytes_max + 1)
        .read_to_end(&mut bytes)
        .map_err(failed)?;
    if bytes.len() as u64 > bytes_max {
        return Err(TokenError::configuration(format!(
            "{what} file {}: larger than {bytes_max} bytes",
            path.display()
        )));
    }
    String::from_utf8(bytes).map_err(|_| {
        TokenError::configuration(format!("{what} file {}: not UTF-8 text", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_token_is_0600_in_a_0700_directory_and_reads_back() {
        let temporary = tempfile::tempdir().unwrap();
        let path = temporary.path().join("new/dir/google.token");
        store(&path, &Secret::new("1//0gabc-DEF_ghi")).unwrap();
        let mode = |path: &Path| fs::metadata(path).unwrap().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&temporary.path().join("new/dir")), 0o700);
        assert_eq!(mode(&temporary.path().join("new")), 0o700);
        assert_eq!(load(&path).unwrap(), Secret::new("1//0gabc-DEF_ghi"));
        assert_eq!(fs::read_to_string(&path).unwrap(), "1//0gabc-DEF_ghi\n");

        // Replacing keeps the mode and leaves no temporary file.
        store(&path, &Secret::new("1//second")).unwrap();
        assert_eq!(load(&path).unwrap(), Secret::new("1//second"));
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn bad_token_files() {
        let temporary = tempfile::tempdir().unwrap();
        let path = temporary.path().join("token");
        let error = load(&path).unwrap_err();
        assert!(
            error.to_string().contains("tsubame oauth google authorize"),
            "{error}"
        );
        for content in ["", "  \n", "two words\n", "caf\u{e9}\n"] {
            fs::write(&path, content).unwrap();
            let error = load(&path).unwrap_err();
            assert!(
                matches!(error, TokenError::Configuration { .. }),
                "{content:?}"
            );
            assert!(!error.to_string().contains("words"), "{error}");
        }
        fs::write(&path, vec![b'x'; TOKEN_FILE_BYTES_MAX as usize + 1]).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("larger than"));
        assert!(store(&path, &Secret::new("a b")).is_err());
    }
}
