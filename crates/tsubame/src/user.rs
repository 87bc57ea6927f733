//! `tsubame user add|list`: device accounts for SMTP AUTH in a users file.
//!
//! `add` hashes the password (argon2id, the argon2 crate's defaults: m = 19 MiB, t = 2,
//! p = 1) and edits the file with `toml_edit`, so other entries, their keys and the
//! file's comments stay as they were. The new file replaces the old one atomically
//! (temporary file in the same directory, synced, renamed, directory synced) and is
//! mode 0600. Neither the password nor the hash is ever printed.

use std::io::{BufRead, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use tsubame_config::users::{PASSWORD_BYTES_MAX, check_user_name, hash_password};

/// Used when neither --users-file nor a configuration's `[auth] users_file` names one.
const DEFAULT_USERS_FILE: &str = "./users.toml";

/// What a new users file starts with.
const NEW_FILE_HEADER: &str = "# tsubame device accounts for SMTP AUTH. Edit passwords with \
    `tsubame user add NAME`;\n# allowed_senders, allowed_recipient_domains and upstream may \
    be added by hand.\n";

#[derive(Debug, clap::Args)]
pub struct UserArgs {
    #[command(subcommand)]
    command: UserCommand,
    /// The configuration whose `[auth] users_file` to use.
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// The users file. Default: the configuration's `[auth] users_file`, else
    /// ./users.toml.
    #[arg(long, value_name = "FILE", global = true)]
    users_file: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum UserCommand {
    /// Add a user, or set a new password for an existing one (its other keys are kept).
    /// Prompts twice for the password, without echo.
    Add {
        /// The login name (1 to 255 bytes, no control characters; case-sensitive).
        name: String,
        /// Read the password from the first line of standard input instead of prompting
        /// (for scripts; keeps it out of the process list).
        #[arg(long)]
        password_stdin: bool,
    },
    /// List the users and their restrictions (never their hashes). With --config and no
    /// --users-file: the configuration's own [[user]] entries and its users file's.
    List,
}

pub fn run(args: UserArgs) -> anyhow::Result<ExitCode> {
    match &args.command {
        UserCommand::Add {
            name,
            password_stdin,
        } => add(&users_file(&args)?, name, *password_stdin),
        UserCommand::List => list(&args),
    }
}

fn users_file(args: &UserArgs) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.users_file {
        return Ok(path.clone());
    }
    if let Some(path) = &args.config {
        // Parse, not load: load reads the users file, which `user add` may be creating.
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config = tsubame_config::Config::parse(&text, &path.display().to_string())?;
        return config.auth.users_file.with_context(|| {
            "the configuration has no [auth] users_file; give --users-file".to_string()
        });
    }
    Ok(PathBuf::from(DEFAULT_USERS_FILE))
}

fn add(path: &Path, name: &str, password_stdin: bool) -> anyhow::Result<ExitCode> {
    check_user_name(name).map_err(|message| anyhow::anyhow!("{message}"))?;
    // Read and check the file first: no password prompt for a file we would refuse.
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    if let Some(text) = &existing {
        tsubame_config::parse_users_text(text, &path.display().to_string())?;
    }
    let mut document: toml_edit::DocumentMut = match &existing {
        Some(text) => text
            .parse()
            .with_context(|| format!("parsing {}", path.display()))?,
        None => NEW_FILE_HEADER
            .parse()
            .context("parsing the new file's header")?,
    };

    let password = if password_stdin {
        password_from_stdin()?
    } else {
        password_from_terminal()?
    };
    let hash = hash_password(&password)?;

    let users = document
        .entry("user")
        .or_insert_with(|| toml_edit::Item::ArrayOfTables(toml_edit::ArrayOfTables::new()))
        .as_array_of_tables_mut()
        .context("`user` in the users file is not an array of [[user]] tables")?;
    let existing_entry = users
        .iter_mut()
        .find(|table| table.get("name").and_then(|item| item.as_str()) == Some(name));
    let replaced = match existing_entry {
        Some(table) => {
            table["password_hash"] = toml_edit::value(hash.expose());
            true
        }
        None => {
            let mut table = toml_edit::Table::new();
            table["name"] = toml_edit::value(name);
            table["password_hash"] = toml_edit::value(hash.expose());
            users.push(table);
            false
        }
    };
    let text = document.to_string();
    // The file we write must load: the same check as at start.
    tsubame_config::parse_users_text(&text, &path.display().to_string())
        .context("the edited users file does not check (nothing written)")?;
    write_atomically(path, text.as_bytes())?;
    if replaced {
        println!(
            "user {name:?}: new password set in {} (other keys kept)",
            path.display()
        );
    } else {
        println!("user {name:?}: added to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn list(args: &UserArgs) -> anyhow::Result<ExitCode> {
    let users = match (&args.users_file, &args.config) {
        (None, Some(config)) => tsubame_config::Config::load(config)?.users,
        _ => tsubame_config::load_users_file(&users_file(args)?)?,
    };
    for user in &users {
        let senders: Vec<String> = user
            .allowed_senders
            .iter()
            .map(ToString::to_string)
            .collect();
        let joined_or_any = |items: &[String]| {
            if items.is_empty() {
                "any".to_string()
            } else {
                items.join(", ")
            }
        };
        println!(
            "{}  senders: {}  recipient domains: {}  upstream: {}",
            user.name,
            joined_or_any(&senders),
            joined_or_any(&user.allowed_recipient_domains),
            user.upstream.as_deref().unwrap_or("by route")
        );
    }
    println!("{} user(s)", users.len());
    Ok(ExitCode::SUCCESS)
}

/// One line of standard input, without its line end. Reads at most a little more than
/// the longest password, so a huge input cannot fill memory.
fn read_password_line(input: &mut impl BufRead) -> anyhow::Result<Vec<u8>> {
    let limit = PASSWORD_BYTES_MAX as u64 + 2;
    let mut line = Vec::new();
    input
        .take(limit)
        .read_until(b'\n', &mut line)
        .context("reading the password")?;
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(line)
}

fn password_from_stdin() -> anyhow::Result<Vec<u8>> {
    let password = read_password_line(&mut std::io::stdin().lock())?;
    if password.is_empty() {
        bail!("empty password (nothing written)");
    }
    Ok(password)
}

/// Prompts twice on standard error with echo off and returns the password if both
/// match.
fn password_from_terminal() -> anyhow::Result<Vec<u8>> {
    let stdin = std::io::stdin();
    if !rustix::termios::isatty(stdin.as_fd()) {
        bail!("standard input is not a terminal; use --password-stdin");
    }
    let first = prompt_without_echo("Password: ")?;
    if first.is_empty() {
        bail!("empty password (nothing written)");
    }
    let second = prompt_without_echo("Again: ")?;
    if first != second {
        bail!("the passwords do not match (nothing written)");
    }
    Ok(first)
}

fn prompt_without_echo(prompt: &str) -> anyhow::Result<Vec<u8>> {
    let mut stderr = std::io::stderr();
    write!(stderr, "{prompt}").context("writing the prompt")?;
    stderr.flush().context("writing the prompt")?;
    let password = {
        let _echo_off = EchoOff::new()?;
        read_password_line(&mut std::io::stdin().lock())?
    };
    // The user's Enter was not echoed either.
    writeln!(stderr).context("writing the prompt")?;
    Ok(password)
}

/// Turns the terminal's echo off on standard input until dropped. (An interrupt while
/// it is off leaves echo off; `stty echo` restores it.)
struct EchoOff {
    original: rustix::termios::Termios,
}

impl std::fmt::Debug for EchoOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EchoOff")
    }
}

impl EchoOff {
    fn new() -> anyhow::Result<Self> {
        use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let original = tcgetattr(stdin.as_fd()).context("reading the terminal's settings")?;
        let mut quiet = original.clone();
        quiet.local_modes.remove(LocalModes::ECHO);
        tcsetattr(stdin.as_fd(), OptionalActions::Flush, &quiet)
            .context("turning the terminal's echo off")?;
        Ok(Self { original })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        // Nothing more can be done if this fails; the message says how to recover.
        if rustix::termios::tcsetattr(
            stdin.as_fd(),
            rustix::termios::OptionalActions::Now,
            &self.original,
        )
        .is_err()
        {
            eprintln!("tsubame: could not turn the terminal's echo back on (run `stty echo`)");
        }
    }
}

/// Replaces `path` with `contents`: a new mode-0600 file next to it, synced, renamed over
/// it, and the directory synced, so a crash leaves the old file or the new one.
fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(file_name);
    temporary_name.push(format!(".tmp-{}", std::process::id()));
    let temporary = directory.join(temporary_name);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .with_context(|| format!("creating {}", temporary.display()))?;
        file.write_all(contents)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", temporary.display()))?;
        std::fs::rename(&temporary, path)
            .with_context(|| format!("renaming {} to {}", temporary.display(), path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result?;
    std::fs::File::open(&directory)
        .and_then(|directory| directory.sync_all())
        .with_context(|| format!("syncing {}", directory.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_lines() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"secret\n", b"secret"),
            (b"secret\r\nmore\n", b"secret"),
            (b"secret", b"secret"),
            (b"\n", b""),
            (b"", b""),
            (b"sp ace \n", b"sp ace "),
        ];
        for (input, want) in cases {
            let got = read_password_line(&mut &input[..]).unwrap();
            assert_eq!(got, *want, "{input:?}");
        }
        let long = vec![b'x'; PASSWORD_BYTES_MAX * 4];
        let got = read_password_line(&mut &long[..]).unwrap();
        assert_eq!(
            got.len(),
            PASSWORD_BYTES_MAX + 2,
            "reading stops past the limit"
        );
    }
}
