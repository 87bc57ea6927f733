//! Disk full: `452 4.3.1`, nothing acknowledged is lost, the server keeps running and
//! accepts mail again once there is room.
//!
//! REQUIRES ROOT: the spool lives on a 4 MiB tmpfs this test mounts (`mount -t tmpfs`),
//! the only way to fill a file system without filling the machine's. CI runs as root.
//! Where the mount is not allowed the test FAILS; it never skips.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;
use tsubame_tests::cli::{inspect, show};
use tsubame_tests::peers::Smtplib;
use tsubame_tests::process::{find_program, hard_limit, run};
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::smtp::RawClient;
use tsubame_tests::{COMMAND_TIMEOUT, assert_bytes_eq};

/// A tmpfs mounted on a temporary directory, unmounted when dropped.
#[derive(Debug)]
struct Tmpfs {
    mount_point: PathBuf,
    _directory: TempDir,
}

fn mount_command(arguments: &[&str], mount_point: &Path, what: &str) -> bool {
    let program = find_program("mount").expect("`mount` is not on PATH (util-linux)");
    let mut command = Command::new(program);
    command.args(arguments).arg(mount_point);
    let finished = run(&mut command, None, COMMAND_TIMEOUT, what);
    if !finished.status.success() {
        eprintln!("{}", finished.describe());
    }
    finished.status.success()
}

impl Tmpfs {
    #[track_caller]
    fn mount(size: &str) -> Tmpfs {
        let directory = tempfile::tempdir().unwrap();
        let mount_point = directory.path().join("fs");
        std::fs::create_dir(&mount_point).unwrap();
        let options = format!("size={size},mode=0700");
        assert!(
            mount_command(
                &["-t", "tmpfs", "-o", &options, "tsubame-e2e"],
                &mount_point,
                "mount -t tmpfs"
            ),
            "cannot mount a {size} tmpfs on {}: this test needs root (CI runs as root); \
             run the suite as root",
            mount_point.display()
        );
        Tmpfs {
            mount_point,
            _directory: directory,
        }
    }

    #[track_caller]
    fn resize(&self, size: &str) {
        let options = format!("remount,size={size}");
        assert!(
            mount_command(&["-o", &options], &self.mount_point, "mount -o remount"),
            "cannot grow the tmpfs to {size}"
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let Some(program) = find_program("umount") else {
            return;
        };
        let mut command = Command::new(program);
        // Lazy: even if something still has a file open, the mount goes away.
        command.arg("-l").arg(&self.mount_point);
        let _ = command.status();
    }
}

/// A message of about `size_bytes` in 100-byte lines, unique by `index`.
fn bulky_message(index: usize, size_bytes: usize) -> Vec<u8> {
    let mut message = format!("Subject: bulky {index}\r\n\r\n").into_bytes();
    let line = format!("{index:04} {}\r\n", "d".repeat(93));
    while message.len() + line.len() <= size_bytes {
        message.extend_from_slice(line.as_bytes());
    }
    message
}

#[test]
fn disk_full_answers_452_loses_nothing_and_recovers_requires_root() {
    let _limit = hard_limit(Duration::from_secs(180));
    let tmpfs = Tmpfs::mount("4m");
    let spool = tmpfs.mount_point.join("spool");
    let server = Server::start(
        &ServerOptions::new()
            .config(
                "[[listener]]\naddress = \"127.0.0.1:0\"\n\n[spool]\nsegment_size_bytes = 1048576\n\n\
                 [limits]\nmax_message_size_bytes = 1048576\nmax_errors_per_session = 100\n",
            )
            .spool(&spool),
    );

    const ATTEMPTS: usize = 24;
    let messages: Vec<Vec<u8>> = (0..ATTEMPTS)
        .map(|index| bulky_message(index, 256 * 1024))
        .collect();
    let mut session = Smtplib::new(server.address()).ehlo();
    for message in &messages {
        session = session
            .mail("bulk@example.com", &[])
            .rcpt("bulk@example.net", &[])
            .data(message);
    }
    let outcomes = session.quit().run();
    assert_eq!(
        outcomes.len(),
        2 + 3 * ATTEMPTS,
        "the session broke off (did the server die?): {:?}\n--- server log ---\n{}",
        outcomes.last(),
        server.log()
    );
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for (index, message) in messages.iter().enumerate() {
        let data = &outcomes[1 + 3 * index + 2];
        match data.code {
            Some(250) => acknowledged.push((data.queued_id(), message)),
            Some(452) => {
                data.expect(452, "4.3.1", &format!("message {index} on a full disk"));
                refused += 1;
            }
            _ => panic!(
                "message {index}: expected 250 or 452 4.3.1, got {:?}\n--- server log ---\n{}",
                data.raw,
                server.log()
            ),
        }
    }
    assert!(
        refused > 0,
        "6 MiB into a 4 MiB file system and never a 452 4.3.1"
    );
    assert!(
        acknowledged.len() >= 2,
        "only {} messages fit into 4 MiB",
        acknowledged.len()
    );

    // Still serving.
    let mut client = RawClient::connect(server.address());
    client.hello();
    client.command_expect("QUIT", 221, "2.0.0");

    // Nothing acknowledged was lost.
    let inspection = inspect(&spool);
    assert_eq!(
        inspection.exit_code(),
        Some(0),
        "{}",
        inspection.run.describe()
    );
    for (id, message) in &acknowledged {
        inspection.expect_message(id);
        assert_bytes_eq(
            tsubame_tests::without_received(&show(&spool, id).content),
            message,
            &format!("message {id}"),
        );
    }
    assert_eq!(
        inspection.messages().len(),
        acknowledged.len(),
        "refused messages must not be in the spool: {}",
        inspection.json
    );

    // Room again: the next message is accepted.
    tmpfs.resize("64m");
    let message = bulky_message(999, 256 * 1024);
    let outcomes = Smtplib::new(server.address())
        .ehlo()
        .mail("bulk@example.com", &[])
        .rcpt("bulk@example.net", &[])
        .data(&message)
        .quit()
        .run();
    outcomes[3].expect(250, "2.0.0", "DATA after the disk has room again");
    let id = outcomes[3].queued_id();
    assert_bytes_eq(
        tsubame_tests::without_received(&show(&spool, &id).content),
        &message,
        "message after recovery",
    );
    server.stop();
}
