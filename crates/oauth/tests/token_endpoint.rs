//! tsubame-oauth against a real token endpoint peer (Python's http.server, RS256
//! checked with the cryptography package), over loopback.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions, too

mod support;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use support::{PeerOptions, ServiceAccountKey, TokenEndpoint, browser_get, throwaway_secret};
use tsubame_oauth::authorize::{Authorization, LoopbackReceiver};
use tsubame_oauth::cache::ManualClock;
use tsubame_oauth::{
    CacheSettings, HttpClient, HttpSettings, RefreshToken, Secret, ServiceAccount, TokenCache,
    TokenError, TokenKey, TokenKind, TokenSource, token_file,
};

const CLIENT_ID: &str = "test-client.apps.googleusercontent.com";
const SERVICE_ACCOUNT: &str = "relay@tsubame-test.iam.gserviceaccount.com";

struct Fixture {
    peer: TokenEndpoint,
    client_secret: String,
    refresh_token: String,
}

fn start(expires_in: Option<u64>) -> Fixture {
    let client_secret = throwaway_secret("GOCSPX");
    let refresh_token = throwaway_secret("1//refresh");
    let peer = TokenEndpoint::start(&PeerOptions {
        client_id: CLIENT_ID.into(),
        client_secret: client_secret.clone(),
        refresh_token: refresh_token.clone(),
        expires_in,
        ..PeerOptions::default()
    });
    Fixture {
        peer,
        client_secret,
        refresh_token,
    }
}

fn http() -> HttpClient {
    HttpClient::new(HttpSettings::default()).unwrap()
}

impl Fixture {
    fn source_with(
        &self,
        refresh_token: &str,
        client_secret: &str,
        http: HttpClient,
    ) -> RefreshToken {
        RefreshToken::new(
            CLIENT_ID,
            Secret::new(client_secret),
            self.peer.token_endpoint(),
            Secret::new(refresh_token),
            http,
        )
    }

    fn source(&self) -> RefreshToken {
        self.source_with(&self.refresh_token, &self.client_secret, http())
    }

    /// No error text may hold a secret of the fixture.
    fn assert_no_secret(&self, text: &str) {
        assert!(!text.contains(&self.client_secret), "{text}");
        assert!(!text.contains(&self.refresh_token), "{text}");
    }
}

#[test]
fn refresh_token_grant() {
    let fixture = start(Some(1800));
    let before = SystemTime::now();
    let token = fixture
        .source()
        .fetch("printer@example.com", before)
        .unwrap();
    assert_eq!(token.secret(), "at-1");
    assert_eq!(token.kind(), TokenKind::Bearer);
    assert_eq!(token.expires_at(), Some(before + Duration::from_secs(1800)));
    let requests = fixture.peer.token_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0]["grant_type"], "refresh_token");
    assert_eq!(requests[0]["ok"], true, "{requests:?}");
}

#[test]
fn invalid_grant_wrong_client_and_server_errors() {
    let fixture = start(None);
    // A revoked refresh token: the peer answers invalid_grant.
    let error = fixture
        .source_with("1//revoked", &fixture.client_secret, http())
        .fetch("a@example.com", SystemTime::now())
        .unwrap_err();
    assert!(error.needs_reauthorization(), "{error}");
    assert!(
        error
            .to_string()
            .contains("Token has been expired or revoked."),
        "{error}"
    );

    fixture.peer.set_mode("invalid_grant");
    let error = fixture
        .source()
        .fetch("a@example.com", SystemTime::now())
        .unwrap_err();
    assert!(matches!(error, TokenError::InvalidGrant { .. }), "{error}");
    fixture.assert_no_secret(&error.to_string());
    fixture.assert_no_secret(&format!("{error:?}"));

    fixture.peer.set_mode("ok");
    let error = fixture
        .source_with(&fixture.refresh_token, "wrong-secret", http())
        .fetch("a@example.com", SystemTime::now())
        .unwrap_err();
    assert!(matches!(error, TokenError::Configuration { .. }), "{error}");
    assert!(!error.to_string().contains("wrong-secret"), "{error}");

    fixture.peer.set_mode("500");
    let error = fixture
        .source()
        .fetch("a@example.com", SystemTime::now())
        .unwrap_err();
    assert!(matches!(error, TokenError::Temporary { .. }), "{error}");
    assert!(error.to_string().contains("answered 500"), "{error}");
    fixture.assert_no_secret(&error.to_string());
    assert_eq!(fixture.peer.token_requests().len(), 4);
}

#[test]
fn a_hanging_endpoint_times_out() {
    let fixture = start(None);
    fixture.peer.set_mode("hang");
    let http = HttpClient::new(HttpSettings {
        io_timeout: Duration::from_secs(1),
        ..HttpSettings::default()
    })
    .unwrap();
    let started = Instant::now();
    let error = fixture
        .source_with(&fixture.refresh_token, &fixture.client_secret, http)
        .fetch("a@example.com", SystemTime::now())
        .unwrap_err();
    assert!(matches!(error, TokenError::Temporary { .. }), "{error}");
    assert!(
        error.to_string().contains("no answer within 1 s"),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    fixture.assert_no_secret(&error.to_string());
}

#[test]
fn https_with_a_verified_certificate() {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let ca = support::TestPki::new();
    let client_secret = throwaway_secret("GOCSPX");
    let refresh_token = throwaway_secret("1//refresh");
    let peer = TokenEndpoint::start(&PeerOptions {
        client_id: CLIENT_ID.into(),
        client_secret: client_secret.clone(),
        refresh_token: refresh_token.clone(),
        tls: Some((ca.certificate(), ca.key())),
        ..PeerOptions::default()
    });
    assert_eq!(peer.token_endpoint().url().scheme(), "https");
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca.ca()).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let trusting = HttpClient::with_tls_config(HttpSettings::default(), Arc::new(tls));
    let source = |http| {
        RefreshToken::new(
            CLIENT_ID,
            Secret::new(client_secret.clone()),
            peer.token_endpoint(),
            Secret::new(refresh_token.clone()),
            http,
        )
    };
    let token = source(trusting)
        .fetch("a@example.com", SystemTime::now())
        .unwrap();
    assert_eq!(token.secret(), "at-1");

    // The default client trusts only the public web PKI: the test CA is unknown.
    let error = source(http())
        .fetch("a@example.com", SystemTime::now())
        .unwrap_err();
    assert!(matches!(error, TokenError::Temporary { .. }), "{error}");
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");
    assert_eq!(
        peer.token_requests().len(),
        1,
        "nothing sent without a verified server"
    );
}

#[test]
fn nothing_listening_is_temporary() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let source = RefreshToken::new(
        CLIENT_ID,
        Secret::new("s"),
        tsubame_oauth::http::Endpoint::parse(&format!("http://127.0.0.1:{port}/token")).unwrap(),
        Secret::new("r"),
        http(),
    );
    let error = source
        .fetch("a@example.com", SystemTime::now())
        .unwrap_err();
    assert!(matches!(error, TokenError::Temporary { .. }), "{error}");
}

#[test]
fn service_account_jwt_is_verified_by_the_peer() {
    let key = ServiceAccountKey::generate("0123456789abcdef0123456789abcdef01234567");
    let peer = TokenEndpoint::start(&PeerOptions {
        client_id: CLIENT_ID.into(),
        service_account: key.peer_option(SERVICE_ACCOUNT),
        deny_sub: vec!["not-delegated@example.com".into()],
        ..PeerOptions::default()
    });
    let key_file = key.write_key_file(SERVICE_ACCOUNT, peer.token_endpoint().url().as_str());
    let source = ServiceAccount::from_key_file(&key_file, http()).unwrap();
    assert_eq!(source.client_email(), SERVICE_ACCOUNT);
    let shown = format!("{source:?}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");

    let token = source
        .fetch("printer@example.com", SystemTime::now())
        .unwrap();
    assert_eq!(token.secret(), "at-1");
    let token = source
        .fetch("scanner@example.com", SystemTime::now())
        .unwrap();
    assert_eq!(token.secret(), "at-2");
    let requests = peer.token_requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0]["ok"], true, "{requests:?}");
    assert_eq!(requests[0]["sub"], "printer@example.com");
    assert_eq!(requests[1]["sub"], "scanner@example.com");
    assert_eq!(
        requests[0]["grant_type"],
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );

    // No delegation for this account: unauthorized_client.
    let error = source
        .fetch("not-delegated@example.com", SystemTime::now())
        .unwrap_err();
    assert!(error.needs_reauthorization(), "{error}");
    assert!(error.to_string().contains("unauthorized_client"), "{error}");

    // A JWT from an hour ago has expired.
    let error = source
        .fetch(
            "printer@example.com",
            SystemTime::now() - Duration::from_secs(3700),
        )
        .unwrap_err();
    assert!(matches!(error, TokenError::InvalidGrant { .. }), "{error}");
}

#[test]
fn service_account_signed_with_another_key_is_refused() {
    let key = ServiceAccountKey::generate("kid-1");
    let other = ServiceAccountKey::generate("kid-1");
    let peer = TokenEndpoint::start(&PeerOptions {
        service_account: key.peer_option(SERVICE_ACCOUNT),
        ..PeerOptions::default()
    });
    let source = ServiceAccount::from_key_json(
        &other.key_file_json(SERVICE_ACCOUNT, peer.token_endpoint().url().as_str()),
        http(),
    )
    .unwrap();
    let error = source
        .fetch("printer@example.com", SystemTime::now())
        .unwrap_err();
    assert!(
        error.to_string().contains("Invalid JWT Signature."),
        "{error}"
    );
    assert_eq!(peer.token_requests()[0]["why"], "Invalid JWT Signature.");
}

fn cache_on(source: RefreshToken, clock: Arc<ManualClock>) -> (Arc<TokenCache>, TokenKey) {
    let cache = TokenCache::new(CacheSettings::default(), clock);
    cache.add_source("gmail", Arc::new(source));
    (
        Arc::new(cache),
        TokenKey::new("gmail", "printer@example.com"),
    )
}

#[test]
fn many_threads_one_refresh() {
    let fixture = start(None);
    let (cache, key) = cache_on(
        fixture.source(),
        Arc::new(ManualClock::new(SystemTime::now())),
    );
    let barrier = Arc::new(Barrier::new(16));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (cache, key, barrier) = (Arc::clone(&cache), key.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                cache.get(&key).unwrap().secret().to_string()
            })
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().unwrap(), "at-1");
    }
    assert_eq!(fixture.peer.token_requests().len(), 1);
    let status = cache.status();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].refresh_count, 1);
    assert!(status[0].has_token);
}

#[test]
fn refresh_ahead_of_expiry_and_after_invalidate() {
    let fixture = start(Some(3600));
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let (cache, key) = cache_on(fixture.source(), Arc::clone(&clock));
    let first = cache.get(&key).unwrap();
    assert_eq!(first.secret(), "at-1");
    clock.advance(Duration::from_secs(3600 - 5 * 60 - 1));
    assert_eq!(cache.get(&key).unwrap(), first);
    assert_eq!(fixture.peer.token_requests().len(), 1);
    clock.advance(Duration::from_secs(2));
    let second = cache.get(&key).unwrap();
    assert_eq!(second.secret(), "at-2");
    assert_eq!(fixture.peer.token_requests().len(), 2);

    // The upstream refused it (535): the next get refreshes.
    cache.invalidate(&key, &second);
    assert_eq!(cache.get(&key).unwrap().secret(), "at-3");
    assert_eq!(fixture.peer.token_requests().len(), 3);
    assert_eq!(cache.status()[0].refresh_count, 3);
}

#[test]
fn backoff_after_failure_sends_nothing() {
    let fixture = start(None);
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let (cache, key) = cache_on(fixture.source(), Arc::clone(&clock));
    fixture.peer.set_mode("500");
    let error = cache.get(&key).unwrap_err();
    assert!(matches!(error, TokenError::Temporary { .. }), "{error}");
    for _ in 0..20 {
        assert_eq!(cache.get(&key).unwrap_err(), error);
    }
    clock.advance(Duration::from_secs(9));
    assert_eq!(cache.get(&key).unwrap_err(), error);
    assert_eq!(
        fixture.peer.token_requests().len(),
        1,
        "no request during backoff"
    );

    fixture.peer.set_mode("invalid_grant");
    clock.advance(Duration::from_secs(1));
    assert!(cache.get(&key).unwrap_err().needs_reauthorization());
    assert_eq!(fixture.peer.token_requests().len(), 2);
    let status = &cache.status()[0];
    assert!(status.needs_reauthorization);
    assert_eq!(status.consecutive_failures, 2);
    assert_eq!(
        status.retry_at,
        Some(clock_now(&clock) + Duration::from_secs(20))
    );
    fixture.assert_no_secret(status.last_error.as_deref().unwrap());

    fixture.peer.set_mode("ok");
    clock.advance(Duration::from_secs(20));
    assert_eq!(cache.get(&key).unwrap().secret(), "at-1");
    assert!(!cache.status()[0].needs_reauthorization);
}

fn clock_now(clock: &ManualClock) -> SystemTime {
    use tsubame_oauth::Clock;
    clock.now()
}

#[test]
fn authorize_with_the_loopback_redirect() {
    let fixture = start(None);
    let receiver = LoopbackReceiver::bind().unwrap();
    let authorization =
        Authorization::new(CLIENT_ID, "printer@example.com", receiver.redirect_uri()).unwrap();
    let consent = authorization.consent_url(&fixture.peer.auth_endpoint());

    // The browser: opens the consent page, follows its redirect to the receiver.
    let browser = std::thread::spawn(move || {
        let (status, location, response) = browser_get(&consent);
        assert_eq!(status, 302, "{response}");
        let location = url::Url::parse(&location.unwrap()).unwrap();
        browser_get(&location)
    });
    let code = receiver
        .receive(authorization.state(), Duration::from_secs(30))
        .unwrap();
    let (status, _, page) = browser.join().unwrap();
    assert_eq!(status, 200);
    assert!(
        page.contains("tsubame: authorised, you can close this tab"),
        "{page}"
    );

    let authorized = authorization
        .exchange(
            &http(),
            &fixture.peer.token_endpoint(),
            &Secret::new(fixture.client_secret.clone()),
            &code,
            SystemTime::now(),
        )
        .unwrap();
    assert!(authorized.refresh_token.expose().starts_with("1//rt-"));
    assert!(authorized.access_token.secret().starts_with("at-"));

    // Stored 0600, and a refresh-token source reads it back and works.
    let directory = tempfile::tempdir().unwrap();
    let token_path = directory.path().join("tokens/printer.token");
    token_file::store(&token_path, &authorized.refresh_token).unwrap();
    let source = RefreshToken::from_token_file(
        CLIENT_ID,
        Secret::new(fixture.client_secret.clone()),
        fixture.peer.token_endpoint(),
        &token_path,
        http(),
    );
    let token = source
        .fetch("printer@example.com", SystemTime::now())
        .unwrap();
    assert!(token.secret().starts_with("at-"));
    let grants: Vec<_> = fixture
        .peer
        .token_requests()
        .iter()
        .map(|request| {
            (
                request["grant_type"].as_str().unwrap().to_string(),
                request["ok"] == true,
            )
        })
        .collect();
    assert_eq!(
        grants,
        [
            ("authorization_code".to_string(), true),
            ("refresh_token".to_string(), true)
        ]
    );
}

#[test]
fn authorize_with_a_pasted_address() {
    let fixture = start(None);
    // The browser is on another machine: the redirect never reaches a receiver here;
    // the person copies the address from the address bar.
    let redirect_uri = {
        let receiver = LoopbackReceiver::bind().unwrap();
        receiver.redirect_uri()
    };
    let authorization =
        Authorization::new(CLIENT_ID, "printer@example.com", redirect_uri.clone()).unwrap();
    let (status, location, response) =
        browser_get(&authorization.consent_url(&fixture.peer.auth_endpoint()));
    assert_eq!(status, 302, "{response}");
    let pasted = location.unwrap();
    assert!(pasted.starts_with(&redirect_uri), "{pasted}");

    let code = authorization
        .code_from_paste(&format!("  {pasted}\n"))
        .unwrap();
    let secret = Secret::new(fixture.client_secret.clone());
    let authorized = authorization
        .exchange(
            &http(),
            &fixture.peer.token_endpoint(),
            &secret,
            &code,
            SystemTime::now(),
        )
        .unwrap();
    assert!(authorized.refresh_token.expose().starts_with("1//rt-"));

    // A code is good once; a wrong verifier is refused as well.
    let error = authorization
        .exchange(
            &http(),
            &fixture.peer.token_endpoint(),
            &secret,
            &code,
            SystemTime::now(),
        )
        .unwrap_err();
    assert!(error.needs_reauthorization(), "{error}");
    let other = Authorization::new(CLIENT_ID, "printer@example.com", redirect_uri).unwrap();
    let (_, location, _) = browser_get(&authorization.consent_url(&fixture.peer.auth_endpoint()));
    let code = authorization.code_from_paste(&location.unwrap()).unwrap();
    let error = other
        .exchange(
            &http(),
            &fixture.peer.token_endpoint(),
            &secret,
            &code,
            SystemTime::now(),
        )
        .unwrap_err();
    assert!(
        error.to_string().contains("code_verifier does not match"),
        "{error}"
    );
}
