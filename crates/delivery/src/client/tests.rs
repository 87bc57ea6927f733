#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::reply::parse_reply;

fn reply(text: &str) -> Reply {
    let (reply, consumed) = parse_reply(text.as_bytes()).unwrap().unwrap();
    assert_eq!(consumed, text.len(), "{text:?}");
    reply
}

/// An EHLO reply advertising `keywords`.
fn ehlo_reply(keywords: &[&str]) -> String {
    let mut lines = vec!["mx.example"];
    lines.extend_from_slice(keywords);
    let mut wire = String::new();
    for (index, line) in lines.iter().enumerate() {
        let separator = if index + 1 == lines.len() { ' ' } else { '-' };
        wire.push_str(&format!("250{separator}{line}\r\n"));
    }
    wire
}

fn ready_session(keywords: &[&str]) -> Session {
    let mut session = Session::new("client.example").unwrap();
    assert_eq!(
        session.on_reply(reply("220 mx.example ESMTP\r\n")),
        Ok(SessionEvent::Write(b"EHLO client.example\r\n".to_vec()))
    );
    assert_eq!(
        session.on_reply(reply(&ehlo_reply(keywords))),
        Ok(SessionEvent::Ready)
    );
    session
}

/// One step of a scripted exchange: what we must write, or what the server answers.
enum Script {
    Write(&'static str),
    Reply(&'static str),
}
use Script::{Reply as R, Write as W};

fn step_bytes(step: &TransactionStep<'_>) -> Option<Vec<u8>> {
    match step {
        TransactionStep::Write(bytes) => Some(bytes.clone()),
        TransactionStep::WriteContent(content) => {
            Some(content.clone().collect::<Vec<_>>().concat())
        }
        TransactionStep::Wait | TransactionStep::Done(_) => None,
    }
}

/// Runs a transaction against a script and returns its result.
fn run(session: &mut Session, message: Message<'_>, script: &[Script]) -> TransactionResult {
    let (mut transaction, mut step) = session.transaction(message).unwrap();
    let mut written = false;
    for (index, item) in script.iter().enumerate() {
        match item {
            Script::Write(expected) => {
                let bytes = step_bytes(&step).unwrap_or_else(|| {
                    panic!("step {index}: expected a write of {expected:?}, got {step:?}")
                });
                assert_eq!(String::from_utf8_lossy(&bytes), *expected, "step {index}");
                written = true;
            }
            Script::Reply(text) => {
                assert!(
                    written || matches!(step, TransactionStep::Wait),
                    "step {index}: unchecked {step:?}"
                );
                step = transaction.on_reply(reply(text)).unwrap();
                written = false;
            }
        }
    }
    match step {
        TransactionStep::Done(result) => {
            assert!(matches!(
                transaction.on_reply(reply("250 late\r\n")),
                Err(ClientError::UnexpectedReply { .. })
            ));
            result
        }
        other => panic!("not done: {other:?}"),
    }
}

fn summary(result: &TransactionResult) -> Vec<String> {
    result
        .outcomes
        .iter()
        .map(|outcome| match outcome {
            RecipientOutcome::Delivered { reply } => format!("delivered {}", reply.code),
            RecipientOutcome::Deferred(reason) => format!("deferred {}", reason_summary(reason)),
            RecipientOutcome::Failed(reason) => format!("failed {}", reason_summary(reason)),
        })
        .collect()
}

fn reason_summary(reason: &Reason) -> String {
    match reason {
        Reason::Reply { stage, reply } => format!("{stage:?} {}", reply.code),
        Reason::Local(failure) => format!("{failure:?}"),
    }
}

fn recipients(addresses: &[&str]) -> Vec<String> {
    addresses
        .iter()
        .map(|address| (*address).to_owned())
        .collect()
}

fn message<'a>(recipients: &'a [String], body: &'a [u8]) -> Message<'a> {
    Message {
        mail_from: "sender@origin.example",
        recipients,
        body_type: BodyType::SevenBit,
        smtputf8: false,
        added_fields: &[],
        body,
    }
}

const PIPELINED: &[&str] = &["PIPELINING", "SIZE 1000", "8BITMIME", "ENHANCEDSTATUSCODES"];

#[test]
fn transaction_cases() {
    struct Case {
        name: &'static str,
        keywords: &'static [&'static str],
        recipients: &'static [&'static str],
        script: Vec<Script>,
        outcomes: &'static [&'static str],
        connection_usable: bool,
    }
    let three = &["a@x.example", "b@x.example", "c@x.example"];
    let cases = vec![
        Case {
            name: "pipelined, mixed RCPT outcomes",
            keywords: PIPELINED,
            recipients: three,
            script: vec![
                W("MAIL FROM:<sender@origin.example> SIZE=7\r\n\
                   RCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nRCPT TO:<c@x.example>\r\n\
                   DATA\r\n"),
                R("250 2.1.0 ok\r\n"),
                R("250 2.1.5 ok\r\n"),
                R("451 4.2.0 later\r\n"),
                R("550 5.1.1 unknown\r\n"),
                R("354 go\r\n"),
                W("Hi\r\n..\r\n.\r\n"),
                R("250 2.0.0 queued\r\n"),
            ],
            outcomes: &["delivered 250", "deferred Rcpt 451", "failed Rcpt 550"],
            connection_usable: true,
        },
        Case {
            name: "one command at a time without PIPELINING",
            keywords: &["8BITMIME"],
            recipients: &["a@x.example", "b@x.example"],
            script: vec![
                W("MAIL FROM:<sender@origin.example>\r\n"),
                R("250 ok\r\n"),
                W("RCPT TO:<a@x.example>\r\n"),
                R("550 no\r\n"),
                W("RCPT TO:<b@x.example>\r\n"),
                R("250 ok\r\n"),
                W("DATA\r\n"),
                R("354 go\r\n"),
                W("Hi\r\n..\r\n.\r\n"),
                R("250 queued\r\n"),
            ],
            outcomes: &["failed Rcpt 550", "delivered 250"],
            connection_usable: true,
        },
        Case {
            name: "MAIL refused without PIPELINING stops at once",
            keywords: &[],
            recipients: &["a@x.example", "b@x.example"],
            script: vec![
                W("MAIL FROM:<sender@origin.example>\r\n"),
                R("451 4.3.0 busy\r\n"),
            ],
            outcomes: &["deferred Mail 451", "deferred Mail 451"],
            connection_usable: true,
        },
        Case {
            name: "MAIL refused with PIPELINING applies to all, 503s read",
            keywords: PIPELINED,
            recipients: &["a@x.example", "b@x.example"],
            script: vec![
                W("MAIL FROM:<sender@origin.example> SIZE=7\r\n\
                   RCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n"),
                R("550 5.7.1 go away\r\n"),
                R("503 5.5.1 no MAIL\r\n"),
                R("503 5.5.1 no MAIL\r\n"),
                R("503 5.5.1 no MAIL\r\n"),
            ],
            outcomes: &["failed Mail 550", "failed Mail 550"],
            connection_usable: true,
        },
        Case {
            name: "DATA refused applies to accepted recipients, then RSET",
            keywords: PIPELINED,
            recipients: &["a@x.example", "b@x.example"],
            script: vec![
                W("MAIL FROM:<sender@origin.example> SIZE=7\r\n\
                   RCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n"),
                R("250 ok\r\n"),
                R("250 ok\r\n"),
                R("550 no\r\n"),
                R("451 4.3.0 not now\r\n"),
                W("RSET\r\n"),
                R("250 reset\r\n"),
            ],
            outcomes: &["deferred Data 451", "failed Rcpt 550"],
            connection_usable: true,
        },
        Case {
            name: "final dot 4xx defers accepted recipients only",
            keywords: &[],
            recipients: &["a@x.example", "b@x.example"],
            script: vec![
                W("MAIL FROM:<sender@origin.example>\r\n"),
                R("250 ok\r\n"),
                W("RCPT TO:<a@x.example>\r\n"),
                R("250 ok\r\n"),
                W("RCPT TO:<b@x.example>\r\n"),
                R("550 no\r\n"),
                W("DATA\r\n"),
                R("354 go\r\n"),
                W("Hi\r\n..\r\n.\r\n"),
                R("452 4.3.1 full\r\n"),
            ],
            outcomes: &["deferred Content 452", "failed Rcpt 550"],
            connection_usable: true,
        },
        Case {
            name: "final dot 5xx fails accepted recipients",
            keywords: PIPELINED,
            recipients: &["a@x.example"],
            script: vec![
                W("MAIL FROM:<sender@origin.example> SIZE=7\r\nRCPT TO:<a@x.example>\r\nDATA\r\n"),
                R("250 ok\r\n"),
                R("250 ok\r\n"),
                R("354 go\r\n"),
                W("Hi\r\n..\r\n.\r\n"),
                R("554 5.6.0 spam\r\n"),
            ],
            outcomes: &["failed Content 554"],
            connection_usable: true,
        },
        Case {
            name: "no recipient accepted, pipelined, DATA refused: RSET",
            keywords: PIPELINED,
            recipients: &["a@x.example", "b@x.example"],
            script: vec![
                W("MAIL FROM:<sender@origin.example> SIZE=7\r\n\
                   RCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n"),
                R("250 ok\r\n"),
                R("550 no\r\n"),
                R("450 later\r\n"),
                R("554 5.5.1 no valid recipients\r\n"),
                W("RSET\r\n"),
                R("250 ok\r\n"),
            ],
            outcomes: &["failed Rcpt 550", "deferred Rcpt 450"],
            connection_usable: true,
        },
        Case {
            name: "no recipient accepted, pipelined, DATA got 354: a single dot",
            keywords: PIPELINED,
            recipients: &["a@x.example"],
            script: vec![
                W("MAIL FROM:<sender@origin.example> SIZE=7\r\nRCPT TO:<a@x.example>\r\nDATA\r\n"),
                R("250 ok\r\n"),
                R("550 no\r\n"),
                R("354 go\r\n"),
                W(".\r\n"),
                R("554 no valid recipients\r\n"),
            ],
            outcomes: &["failed Rcpt 550"],
            connection_usable: false,
        },
        Case {
            name: "no recipient accepted without PIPELINING: no DATA, RSET",
            keywords: &[],
            recipients: &["a@x.example"],
            script: vec![
                W("MAIL FROM:<sender@origin.example>\r\n"),
                R("250 ok\r\n"),
                W("RCPT TO:<a@x.example>\r\n"),
                R("550 no\r\n"),
                W("RSET\r\n"),
                R("250 ok\r\n"),
            ],
            outcomes: &["failed Rcpt 550"],
            connection_usable: true,
        },
        Case {
            name: "421 mid-transaction defers every undecided recipient",
            keywords: PIPELINED,
            recipients: three,
            script: vec![
                W("MAIL FROM:<sender@origin.example> SIZE=7\r\n\
                   RCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nRCPT TO:<c@x.example>\r\n\
                   DATA\r\n"),
                R("250 ok\r\n"),
                R("550 no\r\n"),
                R("421 4.3.2 shutting down\r\n"),
            ],
            outcomes: &["failed Rcpt 550", "deferred Rcpt 421", "deferred Rcpt 421"],
            connection_usable: false,
        },
    ];
    for case in cases {
        let mut session = ready_session(case.keywords);
        let addresses = recipients(case.recipients);
        let result = run(
            &mut session,
            message(&addresses, b"Hi\r\n.\r\n"),
            &case.script,
        );
        assert_eq!(summary(&result), case.outcomes, "{}", case.name);
        assert_eq!(
            result.connection_usable, case.connection_usable,
            "{}",
            case.name
        );
    }
}

#[test]
fn missing_extensions_and_size_fail_without_writing() {
    let addresses = recipients(&["a@x.example", "b@x.example"]);
    let eight_bit = Message {
        body_type: BodyType::EightBitMime,
        ..message(&addresses, b"caf\xc3\xa9\r\n")
    };
    let utf8_flag = Message {
        smtputf8: true,
        ..message(&addresses, b"Hi\r\n")
    };
    let utf8_recipients = recipients(&["j\u{f6}rg@x.example"]);
    let utf8_address = message(&utf8_recipients, b"Hi\r\n");
    let large_body = vec![b'a'; 1001];
    let large = message(&addresses, &large_body);
    // Added fields count towards SIZE: 990 + 12 bytes are over 1000.
    let signed_body = vec![b'a'; 990];
    let signed = Message {
        added_fields: b"X-Added: 1\r\n",
        ..message(&addresses, &signed_body)
    };
    let cases: Vec<(&str, &[&str], Message<'_>, &str)> = vec![
        (
            "8bitmime",
            &["PIPELINING"],
            eight_bit,
            "failed EightBitMimeNotOffered",
        ),
        (
            "smtputf8 flag",
            &["8BITMIME"],
            utf8_flag,
            "failed SmtpUtf8NotOffered",
        ),
        (
            "non-ascii address",
            &[],
            utf8_address,
            "failed SmtpUtf8NotOffered",
        ),
        (
            "size",
            &["SIZE 1000"],
            large,
            "failed MessageTooLarge { message_bytes: 1001, max_message_bytes: 1000 }",
        ),
        (
            "size with added fields",
            &["SIZE 1000"],
            signed,
            "failed MessageTooLarge { message_bytes: 1002, max_message_bytes: 1000 }",
        ),
    ];
    for (name, keywords, message, expected) in cases {
        let mut session = ready_session(keywords);
        let (_, step) = session.transaction(message).unwrap();
        let TransactionStep::Done(result) = step else {
            panic!("{name}: {step:?}");
        };
        assert!(result.connection_usable, "{name}");
        assert_eq!(result.outcomes.len(), message.recipients.len(), "{name}");
        for outcome in summary(&result) {
            assert_eq!(outcome, expected, "{name}");
        }
        // Nothing was sent, so the next message does not need a RSET.
        let ok = recipients(&["a@x.example"]);
        let (_, step) = session.transaction(self::message(&ok, b"")).unwrap();
        let bytes = step_bytes(&step).unwrap();
        assert!(bytes.starts_with(b"MAIL FROM:"), "{name}");
    }
}

#[test]
fn mail_parameters() {
    let addresses = recipients(&["j\u{f6}rg@x.example"]);
    let mut session = ready_session(&["SIZE", "8BITMIME", "SMTPUTF8", "PIPELINING"]);
    let message = Message {
        mail_from: "",
        body_type: BodyType::EightBitMime,
        ..message(&addresses, b"12345")
    };
    let (_, step) = session.transaction(message).unwrap();
    assert_eq!(
        String::from_utf8(step_bytes(&step).unwrap()).unwrap(),
        "MAIL FROM:<> SIZE=5 BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<j\u{f6}rg@x.example>\r\nDATA\r\n"
    );
}

#[test]
fn rset_between_messages() {
    let first = recipients(&["a@x.example"]);
    let second = recipients(&["b@x.example"]);
    for pipelined in [false, true] {
        let keywords: &[&str] = if pipelined { &["PIPELINING"] } else { &[] };
        let mut session = ready_session(keywords);
        let result = if pipelined {
            run(
                &mut session,
                message(&first, b"one\r\n"),
                &[
                    W("MAIL FROM:<sender@origin.example>\r\nRCPT TO:<a@x.example>\r\nDATA\r\n"),
                    R("250 ok\r\n"),
                    R("250 ok\r\n"),
                    R("354 go\r\n"),
                    W("one\r\n.\r\n"),
                    R("250 queued\r\n"),
                ],
            )
        } else {
            run(
                &mut session,
                message(&first, b"one\r\n"),
                &[
                    W("MAIL FROM:<sender@origin.example>\r\n"),
                    R("250 ok\r\n"),
                    W("RCPT TO:<a@x.example>\r\n"),
                    R("250 ok\r\n"),
                    W("DATA\r\n"),
                    R("354 go\r\n"),
                    W("one\r\n.\r\n"),
                    R("250 queued\r\n"),
                ],
            )
        };
        assert_eq!(summary(&result), ["delivered 250"]);
        let result = if pipelined {
            run(
                &mut session,
                message(&second, b"two"),
                &[
                    W(
                        "RSET\r\nMAIL FROM:<sender@origin.example>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n",
                    ),
                    R("250 reset\r\n"),
                    R("250 ok\r\n"),
                    R("250 ok\r\n"),
                    R("354 go\r\n"),
                    W("two\r\n.\r\n"),
                    R("250 queued\r\n"),
                ],
            )
        } else {
            run(
                &mut session,
                message(&second, b"two"),
                &[
                    W("RSET\r\n"),
                    R("250 reset\r\n"),
                    W("MAIL FROM:<sender@origin.example>\r\n"),
                    R("250 ok\r\n"),
                    W("RCPT TO:<b@x.example>\r\n"),
                    R("250 ok\r\n"),
                    W("DATA\r\n"),
                    R("354 go\r\n"),
                    W("two\r\n.\r\n"),
                    R("250 queued\r\n"),
                ],
            )
        };
        assert_eq!(summary(&result), ["delivered 250"], "pipelined {pipelined}");
        assert_eq!(session.quit(), b"QUIT\r\n");
        assert_eq!(
            session.on_reply(reply("221 bye\r\n")),
            Ok(SessionEvent::Closed)
        );
    }
}

#[test]
fn failed_rset_makes_the_connection_unusable() {
    let first = recipients(&["a@x.example"]);
    let mut session = ready_session(&[]);
    let (mut transaction, _) = session.transaction(message(&first, b"")).unwrap();
    // Abandon the first transaction after MAIL is refused.
    assert!(matches!(
        transaction.on_reply(reply("451 no\r\n")),
        Ok(TransactionStep::Done(_))
    ));
    let result = run(
        &mut session,
        message(&first, b""),
        &[W("RSET\r\n"), R("500 what\r\n")],
    );
    assert_eq!(summary(&result), ["deferred Reset 500"]);
    assert!(!result.connection_usable);
}

#[test]
fn helo_fallback_and_session_refusals() {
    let mut session = Session::new("client.example").unwrap();
    session.on_reply(reply("220 old.example\r\n")).unwrap();
    assert_eq!(
        session.on_reply(reply("502 5.5.1 unrecognized\r\n")),
        Ok(SessionEvent::Write(b"HELO client.example\r\n".to_vec()))
    );
    assert_eq!(
        session.on_reply(reply("250 old.example\r\n")),
        Ok(SessionEvent::Ready)
    );
    assert!(session.is_ready());
    assert_eq!(session.capabilities(), &Capabilities::default());

    let cases: &[(&str, &[&str], Stage)] = &[
        ("greeting 554", &["554 no service\r\n"], Stage::Greeting),
        ("ehlo 421", &["220 hi\r\n", "421 bye\r\n"], Stage::Ehlo),
        (
            "helo refused",
            &["220 hi\r\n", "500 what\r\n", "550 no\r\n"],
            Stage::Helo,
        ),
    ];
    for (name, replies, stage) in cases {
        let mut session = Session::new("client.example").unwrap();
        let (last, earlier) = replies.split_last().unwrap();
        for text in earlier {
            assert!(matches!(
                session.on_reply(reply(text)),
                Ok(SessionEvent::Write(_))
            ));
        }
        assert_eq!(
            session.on_reply(reply(last)),
            Ok(SessionEvent::Rejected {
                stage: *stage,
                reply: reply(last)
            }),
            "{name}"
        );
        assert_eq!(
            session.transaction(message(&[], b"")).unwrap_err(),
            ClientError::NotReady
        );
        assert_eq!(session.quit(), b"QUIT\r\n");
    }
}

#[test]
fn invalid_input_is_refused() {
    for name in [
        "",
        "two words",
        "bad\r\nRSET",
        &"x".repeat(MAX_HELO_NAME_BYTES + 1),
    ] {
        assert_eq!(
            Session::new(name).unwrap_err(),
            ClientError::InvalidHeloName,
            "{name:?}"
        );
    }
    let mut session = ready_session(&[]);
    assert_eq!(
        session.transaction(message(&[], b"")).unwrap_err(),
        ClientError::NoRecipients
    );
    for address in [
        "",
        "a@b>\r\nRSET",
        "a b@c",
        "<a@b>",
        &"x".repeat(MAX_ADDRESS_BYTES + 1),
    ] {
        let addresses = recipients(&[address]);
        assert_eq!(
            session.transaction(message(&addresses, b"")).unwrap_err(),
            ClientError::InvalidAddress,
            "{address:?}"
        );
    }
    assert!(matches!(
        session.on_reply(reply("250 stray\r\n")),
        Err(ClientError::UnexpectedReply { .. })
    ));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the server answers, the transaction never panics, ends with one
        /// outcome per recipient once done, and only reports a delivery after the
        /// content got a 2xx.
        #[test]
        fn any_reply_sequence(
            pipelining in any::<bool>(),
            recipient_count in 1usize..5,
            codes in prop::collection::vec(
                prop::sample::select(vec![250u16, 251, 354, 421, 450, 452, 503, 550, 554]),
                0..12,
            ),
        ) {
            let keywords: &[&str] = if pipelining { &["PIPELINING"] } else { &[] };
            let mut session = ready_session(keywords);
            let addresses: Vec<String> =
                (0..recipient_count).map(|index| format!("r{index}@x.example")).collect();
            let (mut transaction, mut step) =
                session.transaction(message(&addresses, b"body\r\n")).unwrap();
            let mut content_code = None;
            let mut content_sent = false;
            for code in codes {
                if matches!(step, TransactionStep::Done(_)) {
                    break;
                }
                if matches!(step, TransactionStep::WriteContent(_)) {
                    content_sent = true;
                }
                let reply = Reply { code, enhanced: None, lines: vec![String::new()] };
                step = transaction.on_reply(reply).unwrap();
                if content_sent && content_code.is_none() {
                    content_code = Some(code);
                }
            }
            if let TransactionStep::Done(result) = step {
                prop_assert_eq!(result.outcomes.len(), recipient_count);
                for outcome in &result.outcomes {
                    if let RecipientOutcome::Delivered { reply } = outcome {
                        prop_assert!(reply.is_positive_completion());
                        prop_assert_eq!(Some(reply.code), content_code);
                    }
                }
            }
        }
    }
}

#[test]
fn abandon_defers_only_undecided_recipients() {
    let mut session = ready_session(&[]);
    let envelope = recipients(&[
        "refused@example.org",
        "accepted@example.org",
        "later@example.org",
    ]);
    let (mut transaction, _) = session
        .transaction(message(&envelope, b"body\r\n"))
        .unwrap();
    transaction.on_reply(reply("250 sender ok\r\n")).unwrap();
    transaction.on_reply(reply("550 no such user\r\n")).unwrap();
    transaction.on_reply(reply("250 ok\r\n")).unwrap();
    let lost = LocalFailure::ConnectionLost {
        detail: "peer reset".to_owned(),
    };
    let result = transaction.abandon(lost.clone());
    assert!(!result.connection_usable);
    assert!(matches!(
        &result.outcomes[0],
        RecipientOutcome::Failed(Reason::Reply {
            stage: Stage::Rcpt,
            ..
        })
    ));
    assert_eq!(
        result.outcomes[1],
        RecipientOutcome::Deferred(Reason::Local(lost.clone()))
    );
    assert_eq!(
        result.outcomes[2],
        RecipientOutcome::Deferred(Reason::Local(lost))
    );
    // The transaction is over: no reply is expected any more.
    assert!(transaction.on_reply(reply("250 late\r\n")).is_err());
}

/// Feeds `replies` one by one and records the stage awaited before each, then after
/// the last one.
fn awaited_stages(
    session: &mut Session,
    envelope: &[String],
    replies: &[&str],
) -> Vec<Option<Stage>> {
    let (mut transaction, _) = session.transaction(message(envelope, b"body\r\n")).unwrap();
    let mut stages = vec![transaction.awaiting_stage()];
    for text in replies {
        transaction.on_reply(reply(text)).unwrap();
        stages.push(transaction.awaiting_stage());
    }
    stages
}

#[test]
fn awaiting_stage_follows_each_reply_of_a_pipelined_group() {
    use Stage::{Content, Data, Mail, Rcpt, Reset};
    let envelope = recipients(&["a@x.example", "b@x.example"]);
    /// Name, PIPELINING offered, the replies, the stages awaited.
    type Case = (
        &'static str,
        bool,
        &'static [&'static str],
        &'static [Option<Stage>],
    );
    let cases: &[Case] = &[
        (
            // One group MAIL+RCPT+RCPT+DATA: each reply has its own stage, so the DATA
            // initiation timeout (RFC 5321 §4.5.3.2.4) applies to the 354.
            "pipelined",
            true,
            &[
                "250 ok\r\n",
                "250 ok\r\n",
                "250 ok\r\n",
                "354 go\r\n",
                "250 queued\r\n",
            ],
            &[
                Some(Mail),
                Some(Rcpt),
                Some(Rcpt),
                Some(Data),
                Some(Content),
                None,
            ],
        ),
        (
            "one at a time",
            false,
            &[
                "250 ok\r\n",
                "250 ok\r\n",
                "250 ok\r\n",
                "354 go\r\n",
                "250 queued\r\n",
            ],
            &[
                Some(Mail),
                Some(Rcpt),
                Some(Rcpt),
                Some(Data),
                Some(Content),
                None,
            ],
        ),
        (
            // No recipient accepted but DATA got 354: the lone dot waits like content.
            "pipelined, every RCPT refused",
            true,
            &[
                "250 ok\r\n",
                "550 no\r\n",
                "550 no\r\n",
                "354 go\r\n",
                "250 ok\r\n",
            ],
            &[
                Some(Mail),
                Some(Rcpt),
                Some(Rcpt),
                Some(Data),
                Some(Content),
                None,
            ],
        ),
        (
            // Without PIPELINING, DATA is never sent: RSET closes the transaction.
            "one at a time, every RCPT refused",
            false,
            &["250 ok\r\n", "550 no\r\n", "550 no\r\n", "250 reset\r\n"],
            &[Some(Mail), Some(Rcpt), Some(Rcpt), Some(Reset), None],
        ),
    ];
    for (name, pipelined, replies, expected) in cases {
        let keywords: &[&str] = if *pipelined { &["PIPELINING"] } else { &[] };
        let mut session = ready_session(keywords);
        assert_eq!(
            &awaited_stages(&mut session, &envelope, replies),
            expected,
            "{name}"
        );
    }

    // A reused connection starts with RSET, pipelined with the rest.
    let mut session = ready_session(&["PIPELINING"]);
    awaited_stages(
        &mut session,
        &envelope,
        &[
            "250 ok\r\n",
            "250 ok\r\n",
            "250 ok\r\n",
            "354 go\r\n",
            "250 queued\r\n",
        ],
    );
    let stages = awaited_stages(&mut session, &envelope, &["250 reset\r\n", "250 ok\r\n"]);
    assert_eq!(stages, [Some(Reset), Some(Mail), Some(Rcpt)]);
}

#[test]
fn starttls_then_ehlo_again_with_fresh_capabilities() {
    let mut session = ready_session(&["STARTTLS", "PIPELINING", "AUTH CRAM-MD5"]);
    assert_eq!(session.awaiting_stage(), None);
    assert_eq!(session.starttls(), Ok(b"STARTTLS\r\n".to_vec()));
    assert_eq!(session.awaiting_stage(), Some(Stage::StartTls));
    assert!(!session.is_ready());
    assert_eq!(
        session.on_reply(reply("220 2.0.0 go ahead\r\n")),
        Ok(SessionEvent::StartTls)
    );
    // RFC 3207 §4.2: nothing learned before TLS survives it.
    assert_eq!(session.capabilities(), &Capabilities::default());
    // A reply before the handshake is plain text injected after the 220.
    assert!(matches!(
        session.on_reply(reply("250 injected\r\n")),
        Err(ClientError::UnexpectedReply { .. })
    ));
    assert_eq!(
        session.tls_established(),
        Ok(b"EHLO client.example\r\n".to_vec())
    );
    assert_eq!(session.awaiting_stage(), Some(Stage::Ehlo));
    // A server that (wrongly) offers STARTTLS again after TLS.
    assert_eq!(
        session.on_reply(reply(&ehlo_reply(&["AUTH PLAIN LOGIN", "STARTTLS"]))),
        Ok(SessionEvent::Ready)
    );
    assert!(session.capabilities().offers_auth("PLAIN"));
    assert!(!session.capabilities().pipelining);
    assert_eq!(session.starttls(), Err(ClientError::StartTlsNotAvailable));
    assert_eq!(session.tls_established(), Err(ClientError::NotReady));
}

#[test]
fn starttls_refusals() {
    let mut plain = ready_session(&["PIPELINING"]);
    assert_eq!(plain.starttls(), Err(ClientError::StartTlsNotAvailable));
    assert!(plain.is_ready(), "a refused call changes nothing");

    let mut not_ready = Session::new("client.example").unwrap();
    assert_eq!(not_ready.starttls(), Err(ClientError::NotReady));
    assert_eq!(not_ready.tls_established(), Err(ClientError::NotReady));

    // 454 (RFC 3207 §4): the session goes on in plain text, capabilities kept.
    let mut session = ready_session(&["STARTTLS", "PIPELINING"]);
    session.starttls().unwrap();
    assert_eq!(
        session.on_reply(reply("454 4.7.0 TLS not available\r\n")),
        Ok(SessionEvent::StartTlsRefused {
            reply: reply("454 4.7.0 TLS not available\r\n")
        })
    );
    assert!(session.is_ready());
    assert!(session.capabilities().pipelining);
    let envelope = recipients(&["a@x.example"]);
    assert!(session.transaction(message(&envelope, b"x\r\n")).is_ok());

    // 421 closes the session.
    let mut session = ready_session(&["STARTTLS"]);
    session.starttls().unwrap();
    assert_eq!(
        session.on_reply(reply("421 4.3.2 shutting down\r\n")),
        Ok(SessionEvent::Rejected {
            stage: Stage::StartTls,
            reply: reply("421 4.3.2 shutting down\r\n")
        })
    );
    assert!(!session.is_ready());
}

#[test]
fn addresses_that_fit_between_angle_brackets() {
    use crate::client::valid_address;
    let cases = [
        ("user@example.com", false, true),
        ("", true, true),
        ("", false, false),
        ("\"john doe\"@example.com", false, true),
        ("\"a<b>c\"@example.com", false, true),
        ("\"with \\\" quote\"@example.com", false, true),
        ("john doe@example.com", false, false),
        ("\"unterminated@example.com", false, false),
        ("\"ok\"@exa mple.com", false, false),
        ("user@example.com>", false, false),
        ("user\r\n@example.com", false, false),
        ("\"a\r\nMAIL\"@example.com", false, false),
    ];
    for (address, empty_allowed, expected) in cases {
        assert_eq!(
            valid_address(address, empty_allowed),
            expected,
            "{address:?} (empty allowed: {empty_allowed})"
        );
    }
}
