//! The spool across server lifetimes: its lock, restarts after SIGTERM and SIGKILL,
//! recovery from a torn tail and from a corrupt record.
//!
//! Segment files are `<16 hex digits>.segment` in the spool directory, records start at
//! 8-byte aligned offsets and the preallocated rest of a segment is zeros
//! (spool-format/README.md). The corruption tests only rely on that and on the record
//! offsets `spool inspect --json` reports.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tsubame_tests::assert_bytes_eq;
use tsubame_tests::cli::{Inspection, inspect, show};
use tsubame_tests::process::{ChildGuard, Signal, hard_limit, send_signal};
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::smtp::{Next, RawClient};

use crate::{assert_spool_ids, send_with_smtplib, test_message};

/// Sends `count` distinct messages; returns (id, content) pairs.
fn send_messages(server: &Server, tag: &str, count: usize) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|index| {
            // Bodies of a few kB, so that the middle of a record is message content.
            let body: String = (0..40)
                .map(|line| format!("{tag} message {index} line {line}: {}\n", "z".repeat(60)))
                .collect();
            let message = test_message(&format!("{tag}-{index}"), &body);
            (send_with_smtplib(server.address(), &message), message)
        })
        .collect()
}

/// Asserts every message is listed and its content byte-exact.
#[track_caller]
fn assert_messages_intact(spool: &Path, messages: &[(String, Vec<u8>)]) {
    let inspection = inspect(spool);
    for (id, content) in messages {
        inspection.expect_message(id);
        assert_bytes_eq(
            tsubame_tests::without_received(&show(spool, id).content),
            content,
            &format!("message {id}"),
        );
    }
}

fn segment_path(spool: &Path, number: u64) -> PathBuf {
    spool.join(format!("{number:016x}.segment"))
}

/// (segment number, offset) of a listed message.
#[track_caller]
fn location(inspection: &Inspection, id: &str) -> (u64, u64) {
    let message = inspection.expect_message(id);
    let segment = message["segment"].as_u64();
    let offset = message["offset"].as_u64();
    match (segment, offset) {
        (Some(segment), Some(offset)) => (segment, offset),
        _ => panic!("message {id} has no segment/offset: {message}"),
    }
}

#[track_caller]
fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

#[track_caller]
fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes)
        .unwrap_or_else(|error| panic!("cannot write {}: {error}", path.display()));
}

/// End of the last record in a segment: the preallocated tail after it is zeros, and a
/// record's padding to its 8-byte alignment is zeros too.
#[track_caller]
fn end_of_records(bytes: &[u8]) -> usize {
    let last_non_zero = bytes
        .iter()
        .rposition(|&byte| byte != 0)
        .expect("segment holds no data at all");
    (last_non_zero + 1).div_ceil(8) * 8
}

/// The writer's copy of a damaged range: `quarantine/SEGMENT-OFFSET.{record,torn}`, both
/// numbers 16 hex digits, holding exactly the damaged bytes.
#[track_caller]
fn assert_quarantine_copy(spool: &Path, segment: u64, offset: u64, kind: &str, expected: &[u8]) {
    let path = spool
        .join("quarantine")
        .join(format!("{segment:016x}-{offset:016x}.{kind}"));
    let copy = std::fs::read(&path).unwrap_or_else(|error| {
        panic!(
            "no quarantine copy {} after the restart ({error}); the spool holds: {:?}",
            path.display(),
            std::fs::read_dir(spool.join("quarantine")).map(|entries| entries
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect::<Vec<_>>())
        )
    });
    assert!(
        copy == expected,
        "{} holds {} bytes, expected the {} damaged bytes",
        path.display(),
        copy.len(),
        expected.len()
    );
}

#[test]
fn second_serve_on_the_same_spool_fails_with_locked() {
    let _limit = hard_limit(Duration::from_secs(60));
    let spool = tempfile::tempdir().unwrap();
    let first = Server::start(&ServerOptions::new().spool(spool.path()));
    let second = Server::try_start(&ServerOptions::new().spool(spool.path()));
    let failure = match second {
        Ok(server) => panic!(
            "a second server started on a locked spool (port {})",
            server.port()
        ),
        Err(failure) => failure,
    };
    assert_eq!(
        failure.status.and_then(|status| status.code()),
        Some(1),
        "second serve should exit 1: {failure}"
    );
    assert!(
        failure.log.contains("locked"),
        "the error should say the spool is locked: {failure}"
    );
    // The first server is unaffected.
    let id = send_with_smtplib(first.address(), &test_message("after-lock", "still here\n"));
    assert_spool_ids(first.spool(), &[&id]);
}

#[test]
fn messages_survive_a_sigterm_restart_and_a_sigkill_restart() {
    let _limit = hard_limit(Duration::from_secs(120));
    let spool = tempfile::tempdir().unwrap();
    let options = ServerOptions::new().spool(spool.path());

    let server = Server::start(&options);
    let mut messages = send_messages(&server, "term", 3);
    // `spool inspect` reads a live spool without its lock.
    assert_messages_intact(spool.path(), &messages);
    let status = server.terminate();
    assert!(
        status.success(),
        "SIGTERM should stop serve with 0: {status}"
    );

    let server = Server::start(&options);
    assert_messages_intact(spool.path(), &messages);
    messages.extend(send_messages(&server, "kill", 3));
    server.kill();

    let server = Server::start(&options);
    let ids: Vec<&str> = messages.iter().map(|(id, _)| id.as_str()).collect();
    assert_spool_ids(spool.path(), &ids);
    assert_messages_intact(spool.path(), &messages);
    let inspection = inspect(spool.path());
    assert!(inspection.quarantined().is_empty(), "{}", inspection.json);
    // Ids stay unique across restarts: a new message gets a new id.
    let new_id = send_with_smtplib(server.address(), &test_message("third-life", "new\n"));
    assert!(!ids.contains(&new_id.as_str()), "id {new_id} reused");
    server.stop();
}

#[test]
fn sigterm_closes_idle_sessions_with_421_and_exits_0() {
    let _limit = hard_limit(Duration::from_secs(60));
    let mut server = Server::start(&ServerOptions::new());
    let mut client = RawClient::connect(server.address());
    client.hello();
    server.send_terminate();
    let reply = client.next(Duration::from_secs(15));
    let log = server.log();
    let status = server.wait_exit();
    match reply {
        Next::Reply(reply) if reply.is(421, "4.3.2") => {}
        other => panic!(
            "an idle session should get 421 4.3.2 at SIGTERM, got {other:?}; \
             serve exited with {status}\n--- server log ---\n{log}"
        ),
    }
    client.expect_closed(Duration::from_secs(10), "after the shutdown 421");
    assert!(
        status.success(),
        "serve exited with {status}\n--- server log ---\n{log}"
    );
}

/// SIGTERM at any moment after start-up is a graceful stop (exit 0): once the relay says
/// it is listening, a service manager may stop it at any time. The thread that reads the
/// log sends the signal the moment the `listening` line arrives; the race this probes is
/// narrow, hence the many attempts.
#[test]
fn sigterm_right_after_the_listening_line_is_graceful() {
    let _limit = hard_limit(Duration::from_secs(120));
    for attempt in 1..=60 {
        let spool = tempfile::tempdir().unwrap();
        let mut command = Command::new(tsubame_tests::binary::tsubame());
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--spool"])
            .arg(spool.path().join("spool"))
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut server = ChildGuard::spawn(&mut command, "tsubame serve");
        let stderr = server.take_stderr().unwrap();
        let pid = server.id();
        // The reader signals the live child: the main thread does not reap it before
        // the log ends, which is at the child's exit.
        let log = std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut text = String::new();
            loop {
                let before = text.len();
                match reader.read_line(&mut text) {
                    Ok(0) | Err(_) => return (text, false),
                    Ok(_) => {}
                }
                if text[before..].contains("listening") {
                    let _ = send_signal(pid, Signal::TERM);
                    let _ = reader.read_to_string(&mut text);
                    return (text, true);
                }
            }
        });
        let (text, signalled) = log.join().unwrap();
        let status = server.wait_timeout(tsubame_tests::SHUTDOWN_TIMEOUT);
        let status = status.unwrap_or_else(|| {
            server.kill();
            panic!("serve did not stop after SIGTERM:\n{text}")
        });
        assert!(
            signalled,
            "serve exited before listening ({status}):\n{text}"
        );
        assert!(
            status.success(),
            "attempt {attempt}: SIGTERM right after the listening line ended serve with {status} \
             instead of a graceful stop (exit 0)\n--- server log ---\n{text}"
        );
    }
}

#[test]
fn torn_tail_after_a_crash_is_recovered() {
    let _limit = hard_limit(Duration::from_secs(120));
    let spool = tempfile::tempdir().unwrap();
    let options = ServerOptions::new().spool(spool.path());
    let server = Server::start(&options);
    let messages = send_messages(&server, "torn", 3);
    server.kill();

    let inspection = inspect(spool.path());
    let (segment, last_offset) = location(&inspection, &messages[2].0);
    let path = segment_path(spool.path(), segment);
    let original = read_file(&path);
    let end = end_of_records(&original);

    // Case 1: the crash cut the write of a next record: garbage right after the last
    // complete record. All three messages stay; the garbage is a torn tail.
    let mut bytes = original.clone();
    let garbage: Vec<u8> = (0..100_u8).map(|n| n.wrapping_mul(37) | 1).collect();
    bytes
        .get_mut(end..end + garbage.len())
        .expect("room after the last record")
        .copy_from_slice(&garbage);
    write_file(&path, &bytes);
    let inspection = inspect(spool.path());
    assert_eq!(
        inspection.exit_code(),
        Some(0),
        "a torn tail is not corruption: {}",
        inspection.run.describe()
    );
    assert!(inspection.quarantined().is_empty(), "{}", inspection.json);
    let torn: Vec<&Value> = inspection.torn_tails().iter().collect();
    assert_eq!(torn.len(), 1, "{}", inspection.json);
    assert_eq!(torn[0]["offset"], end as u64, "{}", inspection.json);
    assert_messages_intact(spool.path(), &messages);

    // Case 2: the last record itself was cut: its second half never reached the disk.
    let mut bytes = original.clone();
    let cut_from = last_offset as usize + (end - last_offset as usize) / 2;
    bytes
        .get_mut(cut_from..end)
        .expect("last record inside the file")
        .fill(0);
    write_file(&path, &bytes);
    let inspection = inspect(spool.path());
    assert_eq!(
        inspection.exit_code(),
        Some(0),
        "{}",
        inspection.run.describe()
    );
    assert!(inspection.quarantined().is_empty(), "{}", inspection.json);
    assert_eq!(inspection.torn_tails().len(), 1, "{}", inspection.json);
    assert_eq!(
        inspection.torn_tails()[0]["offset"],
        last_offset,
        "{}",
        inspection.json
    );
    assert_spool_ids(spool.path(), &[&messages[0].0, &messages[1].0]);
    assert_messages_intact(spool.path(), &messages[..2]);

    // The server starts on it and keeps working.
    let server = Server::start(&options);
    // Recovery keeps a copy of the torn bytes (spool-format/README.md, recovery step 5).
    let torn_end = bytes.iter().rposition(|&byte| byte != 0).unwrap() + 1;
    assert_quarantine_copy(
        spool.path(),
        segment,
        last_offset,
        "torn",
        &bytes[last_offset as usize..torn_end],
    );
    let new = send_messages(&server, "after-torn", 1);
    assert_messages_intact(spool.path(), &messages[..2]);
    assert_messages_intact(spool.path(), &new);
    server.stop();
    assert_spool_ids(spool.path(), &[&messages[0].0, &messages[1].0, &new[0].0]);
}

#[test]
fn corrupt_record_in_the_middle_is_quarantined_and_the_rest_survives() {
    let _limit = hard_limit(Duration::from_secs(120));
    let spool = tempfile::tempdir().unwrap();
    let options = ServerOptions::new().spool(spool.path());
    let server = Server::start(&options);
    let messages = send_messages(&server, "flip", 3);
    server.stop();

    let inspection = inspect(spool.path());
    let (segment, second_offset) = location(&inspection, &messages[1].0);
    let (third_segment, third_offset) = location(&inspection, &messages[2].0);
    assert_eq!(
        segment, third_segment,
        "messages 2 and 3 should share a segment"
    );
    assert!(third_offset > second_offset);
    let path = segment_path(spool.path(), segment);
    let mut bytes = read_file(&path);
    let flip_at = (second_offset + (third_offset - second_offset) / 2) as usize;
    *bytes.get_mut(flip_at).expect("record 2 inside the file") ^= 0x5a;
    write_file(&path, &bytes);

    let inspection = inspect(spool.path());
    assert_eq!(
        inspection.exit_code(),
        Some(3),
        "spool inspect must exit 3 on a corrupt record: {}",
        inspection.run.describe()
    );
    let quarantined = inspection.quarantined();
    assert_eq!(quarantined.len(), 1, "{}", inspection.json);
    assert_eq!(
        quarantined[0]["offset"], second_offset,
        "{}",
        inspection.json
    );
    assert!(
        quarantined[0]["segment"]
            .as_str()
            .is_some_and(|path| path.ends_with(&format!("{segment:016x}.segment"))),
        "quarantined segment path: {}",
        quarantined[0]
    );
    assert!(
        quarantined[0]["reason"]
            .as_str()
            .is_some_and(|reason| !reason.is_empty()),
        "{}",
        quarantined[0]
    );
    let mut listed = inspection.ids();
    listed.sort();
    let mut expected = vec![messages[0].0.clone(), messages[2].0.clone()];
    expected.sort();
    assert_eq!(listed, expected, "{}", inspection.json);
    assert_bytes_eq(
        tsubame_tests::without_received(&show(spool.path(), &messages[0].0).content),
        &messages[0].1,
        "message 1",
    );
    assert_bytes_eq(
        tsubame_tests::without_received(&show(spool.path(), &messages[2].0).content),
        &messages[2].1,
        "message 3",
    );
    // The table output says so too.
    let spool_text = spool.path().display().to_string();
    let table = tsubame_tests::cli::tsubame(&["spool", "inspect", "--spool", &spool_text]);
    table.assert_code(3);
    assert!(
        table.stdout_text().contains("CORRUPT")
            && table.stdout_text().contains(&second_offset.to_string()),
        "{}",
        table.describe()
    );

    // The server restarts on the damaged spool and accepts mail.
    let server = Server::start(&options);
    // Recovery keeps a copy of the damaged range (spool-format/README.md, recovery step 5).
    assert_quarantine_copy(
        spool.path(),
        segment,
        second_offset,
        "record",
        &bytes[second_offset as usize..third_offset as usize],
    );
    let new = send_messages(&server, "after-flip", 1);
    server.stop();
    let inspection = inspect(spool.path());
    let mut listed = inspection.ids();
    listed.sort();
    let mut expected = vec![
        messages[0].0.clone(),
        messages[2].0.clone(),
        new[0].0.clone(),
    ];
    expected.sort();
    assert_eq!(listed, expected, "{}", inspection.json);
    assert_messages_intact(spool.path(), &new);
}
