//! The listener side's TLS configuration against a client nobody here wrote:
//! `openssl s_client`. Certificates are made per test by `tsubame_tests::pki` (the
//! `openssl` command).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tsubame_server::tls::{ReloadableTls, TlsConfigError, load_server_config};
use tsubame_tests::pki::TestPki;

/// Serves TLS handshakes on a loopback port with the current configuration of `tls`,
/// one connection at a time, until the test ends.
fn serve(tls: Arc<ReloadableTls>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let Ok(connection) = rustls::ServerConnection::new(tls.current()) else {
                continue;
            };
            let mut tls_stream = rustls::StreamOwned::new(connection, &mut stream);
            if tls_stream.write_all(b"220 tls test\r\n").is_err() {
                continue;
            }
            let mut buffer = [0u8; 256];
            let _ = tls_stream.read(&mut buffer);
        }
    });
    port
}

/// `openssl s_client` against the port; its exit status and output.
fn s_client(directory: &Path, port: u16, extra: &[&str]) -> (bool, String) {
    let output = Command::new("openssl")
        .current_dir(directory)
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-CAfile",
            "ca.pem",
        ])
        .args(["-verify_return_error", "-brief"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn serves_tls_1_3_and_1_2_and_refuses_1_0() {
    let pki = TestPki::new();
    let directory = pki.directory();
    let (certificate, key) = pki.issue("first", "first");
    let tls = Arc::new(ReloadableTls::load(&certificate, &key).unwrap());
    let port = serve(tls);
    let (ok, text) = s_client(directory, port, &["-tls1_3"]);
    assert!(
        ok && text.contains("TLSv1.3") && text.contains("Verification: OK"),
        "{text}"
    );
    let (ok, text) = s_client(directory, port, &["-tls1_2"]);
    assert!(ok && text.contains("TLSv1.2"), "{text}");
    // The client is allowed TLS 1.0 at security level 0, so a refusal is the server's.
    let (ok, text) = s_client(directory, port, &["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"]);
    // The server's alert, not a client that could not even offer TLS 1.0.
    assert!(
        !ok && text.contains("SSL alert number"),
        "TLS 1.0 must be refused by the server: {text}"
    );
}

#[test]
fn reload_takes_a_new_certificate_and_keeps_the_old_one_on_error() {
    let pki = TestPki::new();
    let directory = pki.directory();
    let (first_certificate, first_key) = pki.issue("first", "first");
    let (second_certificate, second_key) = pki.issue("second", "second");
    let certificate = directory.join("live.pem");
    let key = directory.join("live.key");
    std::fs::copy(&first_certificate, &certificate).unwrap();
    std::fs::copy(&first_key, &key).unwrap();
    let tls = Arc::new(ReloadableTls::load(&certificate, &key).unwrap());
    let port = serve(Arc::clone(&tls));
    let (ok, text) = s_client(directory, port, &["-showcerts"]);
    assert!(
        ok && (text.contains("CN=first") || text.contains("CN = first")),
        "{text}"
    );

    // A broken file: the reload fails, the first certificate stays.
    std::fs::write(&certificate, b"not a certificate").unwrap();
    assert!(matches!(
        tls.reload(),
        Err(TlsConfigError::NoCertificate { .. })
    ));
    let (ok, text) = s_client(directory, port, &[]);
    assert!(ok, "the old certificate must still be served: {text}");

    // The renewed pair: new handshakes get it.
    std::fs::copy(&second_certificate, &certificate).unwrap();
    std::fs::copy(&second_key, &key).unwrap();
    tls.reload().unwrap();
    let (ok, text) = s_client(directory, port, &["-showcerts"]);
    assert!(
        ok && (text.contains("CN=second") || text.contains("CN = second")),
        "{text}"
    );
}

#[test]
fn bad_files_are_refused_with_their_names_and_no_key_material() {
    let pki = TestPki::new();
    pki.issue("first", "first");
    pki.issue("second", "second");
    let path = |name: &str| pki.directory().join(name);
    // A key that is not the certificate's.
    let error = load_server_config(&path("first.pem"), &path("second.key")).unwrap_err();
    assert!(matches!(error, TlsConfigError::Mismatch { .. }), "{error}");
    // The key file given as the certificate, and the certificate as the key.
    let error = load_server_config(&path("first.key"), &path("first.key")).unwrap_err();
    assert!(
        matches!(error, TlsConfigError::NoCertificate { .. }),
        "{error}"
    );
    let error = load_server_config(&path("first.pem"), &path("first.pem")).unwrap_err();
    assert!(matches!(error, TlsConfigError::BadKey { .. }), "{error}");
    assert!(error.to_string().contains("first.pem"), "{error}");
    let key_text = std::fs::read_to_string(path("first.key")).unwrap();
    let body = key_text.lines().nth(1).unwrap();
    for error in [
        load_server_config(&path("first.pem"), &path("second.key")).unwrap_err(),
        load_server_config(&path("missing.pem"), &path("first.key")).unwrap_err(),
    ] {
        assert!(!error.to_string().contains(body), "key material in {error}");
    }
}
