//! Whole SMTP sessions from hostile clients, through the session state machine the event
//! loop drives: commands, DATA and BDAT content, STARTTLS and AUTH exchanges, with the
//! loop's side (commits, TLS, login checks) played here.
//!
//! The first byte sets the listener (certificate, relaxations, require_auth) and whether
//! the client may relay; the rest is the client's bytes, cut into reads at each 0xFF
//! byte. Every reply must be a well-formed SMTP reply line, the session must never
//! consume more than it was given, and nothing may panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tsubame_config::{Limits, ListenerConfig, ListenerProfile, User, Users};
use tsubame_server::rates::RatePolicy;
use tsubame_server::session::{Event, Session, SessionContext, TlsInfo};

/// One account, `scanner` with password `right`: hashing is slow, so once per process.
fn users() -> &'static Users {
    static USERS: OnceLock<Users> = OnceLock::new();
    USERS.get_or_init(|| {
        Users::new(vec![User {
            name: "scanner".to_string(),
            password_hash: tsubame_config::users::hash_password(b"right").expect("hash"),
            allowed_senders: vec![
                tsubame_config::SenderPattern::parse("@example.com").expect("pattern"),
            ],
            allowed_recipient_domains: Vec::new(),
            upstream: None,
        }])
        .expect("users")
    })
}

/// Every complete line in `out` is `DDD SP text` or `DDD-text`, ends in CRLF, and holds
/// no other CR or LF.
fn check_replies(out: &[u8]) {
    assert!(
        out.is_empty() || out.ends_with(b"\r\n"),
        "reply without CRLF"
    );
    for line in out
        .split(|&byte| byte == b'\n')
        .filter(|line| !line.is_empty())
    {
        let line = line.strip_suffix(b"\r").expect("CR before LF");
        assert!(!line.contains(&b'\r'), "bare CR in a reply");
        assert!(
            line.len() >= 3 && line[..3].iter().all(u8::is_ascii_digit),
            "{line:?}"
        );
        assert!(matches!(line.get(3), None | Some(b' ' | b'-')), "{line:?}");
    }
}

fuzz_target!(|input: &[u8]| {
    let [flags, rest @ ..] = input else {
        return;
    };
    let mut listener = ListenerConfig::plain("127.0.0.1:2525".parse().expect("address"));
    if flags & 1 != 0 {
        listener.certificate_file = Some("cert.pem".into());
        listener.key_file = Some("key.pem".into());
    }
    if flags & 2 != 0 {
        listener.profile = Some(ListenerProfile::LegacyDevice);
    }
    listener.require_auth = flags & 4 != 0;
    let limits = Limits {
        max_message_size_bytes: 4096,
        max_command_line_bytes: 1024,
        max_text_line_bytes: 1000,
        ..Limits::default()
    };
    let no_users = Users::default();
    let rates = RatePolicy::unlimited();
    let context = SessionContext {
        hostname: "relay.test",
        limits: &limits,
        may_relay: flags & 8 != 0,
        listener: &listener,
        users: if flags & 16 != 0 { users() } else { &no_users },
        rates: &rates,
        now_unix_ms: 1_700_000_000_000,
        stamp_received: flags & 32 != 0,
    };
    let mut session = Session::new("192.0.2.7:40000".parse().expect("address"));
    session.set_traced(flags & 64 != 0);
    let mut out = Vec::new();
    // Replies before this index have been checked: each is checked once, not again after
    // every later read (that rescan made the target quadratic in the number of reads).
    let mut checked = 0;
    let mut buffered = Vec::new();
    'reads: for read in rest.split(|&byte| byte == 0xFF) {
        buffered.extend_from_slice(read);
        loop {
            let (used, event) = session.process(&buffered, &mut out, &context);
            assert!(used <= buffered.len(), "consumed more than given");
            buffered.drain(..used);
            match event {
                Event::NeedInput => break,
                Event::Close => break 'reads,
                Event::AwaitingCommit => {
                    // Only a login in flight or a commit can wait; neither is pending
                    // here, since both are answered at once below.
                    panic!("session waits with nothing pending");
                }
                Event::MessageReady => {
                    let parts = session.message().expect("message ready");
                    assert!(!parts.recipients.is_empty(), "message without recipients");
                    session.spooled();
                    session.committed("0000000000000001", &mut out);
                }
                Event::StartTls => {
                    buffered.clear();
                    session.tls_started();
                    session.tls_established(TlsInfo {
                        version: "TLSv1.3",
                        cipher: "TLS13_AES_128_GCM_SHA256".to_string(),
                    });
                }
                Event::Login => {
                    let credentials = session.take_credentials().expect("credentials");
                    if credentials.username == "scanner"
                        && credentials.password().expose() == b"right"
                    {
                        session.login_succeeded(&credentials.username, &mut out);
                    } else {
                        session.login_failed(
                            tsubame_smtp_proto::reply::Reply::new(
                                535,
                                tsubame_smtp_proto::reply::EnhancedCode::new(5, 7, 8),
                                "Authentication credentials invalid",
                            ),
                            &mut out,
                            &context,
                        );
                    }
                }
            }
        }
        check_replies(&out[checked..]);
        checked = out.len();
    }
    check_replies(&out[checked..]);
    let _ = session.take_transcript();
});
