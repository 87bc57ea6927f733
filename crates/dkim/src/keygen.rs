//! New DKIM keys, as PEM, and writing them to a 0600 file atomically.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::Error;

/// RSA sizes `keygen` offers: 2048 is the floor (`RSA_BITS_MIN`); larger keys cost
/// signing time (4096 is about 8x slower than 2048) and longer TXT records.
pub const RSA_BITS_ALLOWED: [u32; 3] = [2048, 3072, 4096];

/// PEM lines are 64 base64 characters (RFC 7468 section 2).
const PEM_LINE_CHARACTERS: usize = 64;

/// A new Ed25519 key in PKCS#8 PEM (`BEGIN PRIVATE KEY`), from ring's generator.
pub fn generate_ed25519_pem() -> Result<Vec<u8>, Error> {
    let random = ring::rand::SystemRandom::new();
    let pkcs8 =
        ring::signature::Ed25519KeyPair::generate_pkcs8(&random).map_err(|_| Error::Generate {
            reason: "the system random number generator failed".to_string(),
        })?;
    Ok(pem_encode("PRIVATE KEY", pkcs8.as_ref()))
}

/// A new RSA key in PKCS#8 PEM, from `openssl genpkey`: ring cannot generate RSA keys
/// and no pure-Rust RSA crate is in the workspace. The key travels over a pipe, never
/// through a file other than the one `write_key_file` creates.
pub fn generate_rsa_pem(bits: u32) -> Result<Vec<u8>, Error> {
    if !RSA_BITS_ALLOWED.contains(&bits) {
        return Err(Error::UnsupportedRsaBits { bits });
    }
    let output = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            &format!("rsa_keygen_bits:{bits}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|error| Error::Generate {
            reason: if error.kind() == std::io::ErrorKind::NotFound {
                "RSA keys are generated with `openssl genpkey`, and openssl is not on PATH \
                 (install the openssl package, or use --algorithm ed25519)"
                    .to_string()
            } else {
                format!("cannot run openssl: {error}")
            },
        })?;
    if !output.status.success() {
        return Err(Error::Generate {
            reason: format!(
                "openssl genpkey failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(output.stdout)
}

fn pem_encode(label: &str, der: &[u8]) -> Vec<u8> {
    let encoded = BASE64.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n").into_bytes();
    for line in encoded.as_bytes().chunks(PEM_LINE_CHARACTERS) {
        pem.extend_from_slice(line);
        pem.push(b'\n');
    }
    pem.extend_from_slice(format!("-----END {label}-----\n").as_bytes());
    pem
}

/// Writes `pem` to `path` with mode 0600, atomically: a temporary file in the same
/// directory (created 0600 by `tempfile`), synced, then renamed into place, so a crash
/// leaves either no key or the whole key. Without `force` an existing file is an error
/// (and the check and the rename are one step, `persist_noclobber`).
pub fn write_key_file(path: &Path, pem: &[u8], force: bool) -> Result<(), Error> {
    let write_error = |source| Error::WriteKey {
        path: path.to_path_buf(),
        source,
    };
    if !force && path.exists() {
        return Err(Error::KeyFileExists {
            path: path.to_path_buf(),
        });
    }
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut temporary = tempfile::Builder::new()
        .prefix(".dkim-key-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(directory)
        .map_err(write_error)?;
    temporary.write_all(pem).map_err(write_error)?;
    temporary.as_file().sync_all().map_err(write_error)?;
    if force {
        temporary
            .persist(path)
            .map_err(|error| write_error(error.error))?;
    } else {
        temporary.persist_noclobber(path).map_err(|error| {
            if error.error.kind() == std::io::ErrorKind::AlreadyExists {
                Error::KeyFileExists {
                    path: path.to_path_buf(),
                }
            } else {
                write_error(error.error)
            }
        })?;
    }
    // The rename is durable once the directory is synced.
    std::fs::File::open(directory)
        .and_then(|directory| directory.sync_all())
        .map_err(write_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Algorithm, SigningKey};
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn ed25519_pem_loads_back() {
        let pem = generate_ed25519_pem().unwrap();
        let key = SigningKey::from_pem(&pem, "generated").unwrap();
        assert_eq!(key.algorithm(), Algorithm::Ed25519Sha256);
        assert!(key.dns_txt_value().starts_with("v=DKIM1; k=ed25519; p="));
    }

    #[test]
    fn rsa_bits_outside_the_allowed_set_are_refused() {
        for bits in [512, 1024, 2047, 8192] {
            assert!(matches!(
                generate_rsa_pem(bits),
                Err(Error::UnsupportedRsaBits { .. })
            ));
        }
    }

    #[test]
    fn key_file_is_0600_and_not_overwritten_without_force() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("example.key");
        write_key_file(&path, b"first", false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            write_key_file(&path, b"second", false),
            Err(Error::KeyFileExists { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        write_key_file(&path, b"second", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(directory.path()).unwrap().count(), 1);
    }
}
