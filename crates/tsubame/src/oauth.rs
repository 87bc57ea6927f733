//! `tsubame oauth google authorize`: the one-time OAuth consent for a Google account on
//! a headless server, ending in a refresh token file (mode 0600).
//!
//! The consent URL is printed; the person opens it in any browser, signed in as the
//! account. When that browser runs on this machine (or reaches it through
//! `ssh -L PORT:127.0.0.1:PORT`), Google's redirect lands on the loopback receiver and
//! the command finishes by itself. When it runs elsewhere, the redirect fails to load
//! there, and the person pastes the address from the browser's address bar (or only
//! the code) into this command's standard input. Whichever comes first wins. The work
//! is in `tsubame_oauth::authorize`; neither the refresh token nor the access token is
//! ever printed.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use tsubame_oauth::authorize::{Authorization, AuthorizeError, LoopbackReceiver};
use tsubame_oauth::http::Endpoint;
use tsubame_oauth::{HttpClient, HttpSettings, Secret, token_file};

/// Largest client secret file read: Google's secrets are 35 characters.
const CLIENT_SECRET_FILE_BYTES_MAX: u64 = 4096;
/// Longest pasted line read: a redirected address is a few hundred bytes.
const PASTED_LINE_BYTES_MAX: u64 = 16 * 1024;

#[derive(Debug, clap::Args)]
pub struct OauthArgs {
    #[command(subcommand)]
    command: OauthCommand,
}

#[derive(Debug, clap::Subcommand)]
enum OauthCommand {
    /// Google accounts (smtp.gmail.com with XOAUTH2).
    Google {
        #[command(subcommand)]
        command: GoogleCommand,
    },
    /// Get a token for ACCOUNT and log in to the upstream with it, without sending mail:
    /// the check after `authorize`, or when mail for an account is deferred.
    Test(TestArgs),
    /// Every OAuth account the configuration names: whether its refresh token file is
    /// there, and (while the server runs) its token's expiry, refreshes and last error.
    Status(StatusArgs),
}

#[derive(Debug, clap::Args)]
struct TestArgs {
    /// The account to log in as (the mailbox the token is for).
    account: String,
    /// The configuration file.
    #[arg(short, long, value_name = "FILE")]
    config: PathBuf,
    /// The upstream to log in to; default: the first that uses OAuth.
    #[arg(long, value_name = "NAME")]
    upstream: Option<String>,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// The configuration file.
    #[arg(short, long, value_name = "FILE")]
    config: PathBuf,
    /// The running server's spool directory, when not the configuration's.
    #[arg(long, value_name = "DIR")]
    spool: Option<PathBuf>,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum GoogleCommand {
    /// Obtain a refresh token for an account, once, on a server without a browser:
    /// prints a consent URL to open in any browser, then takes Google's redirect on a
    /// loopback port or the redirected address pasted on standard input, and stores the
    /// refresh token in --token-file (mode 0600). Needs an OAuth client of type
    /// "Desktop app" from the Google Cloud console.
    Authorize(AuthorizeArgs),
}

#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("client_secret")
        .required(true)
        .args(["client_secret_file", "client_secret_env"])
))]
#[command(group(
    clap::ArgGroup::new("token_place")
        .required(true)
        .args(["token_file", "token_directory"])
))]
struct AuthorizeArgs {
    /// The OAuth client's id (….apps.googleusercontent.com).
    #[arg(long, value_name = "ID")]
    client_id: String,
    /// A file holding the OAuth client's secret (keep it 0600).
    #[arg(long, value_name = "FILE")]
    client_secret_file: Option<PathBuf>,
    /// An environment variable holding the OAuth client's secret.
    #[arg(long, value_name = "VAR")]
    client_secret_env: Option<String>,
    /// The Google account to authorise (the sender address; sent as the login hint).
    #[arg(long, value_name = "ADDRESS")]
    account: String,
    /// Where to store the refresh token (created 0600, its directory 0700 if new;
    /// replaced atomically).
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Store the refresh token as DIR/ACCOUNT.token: where an `[[oauth]]` source with
    /// `token_directory = DIR` looks for it.
    #[arg(long, value_name = "DIR")]
    token_directory: Option<PathBuf>,
    /// Do not listen for the browser's redirect; only read the pasted address or code
    /// (the browser runs on another machine).
    #[arg(long)]
    no_browser_wait: bool,
    /// The authorisation (consent) endpoint.
    #[arg(long, value_name = "URL", default_value = tsubame_oauth::GOOGLE_AUTH_ENDPOINT)]
    auth_endpoint: String,
    /// The token endpoint.
    #[arg(long, value_name = "URL", default_value = tsubame_oauth::GOOGLE_TOKEN_ENDPOINT)]
    token_endpoint: String,
    /// Give up after this many seconds without a redirect or pasted code.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    timeout_secs: u64,
}

pub fn run(args: OauthArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        OauthCommand::Google {
            command: GoogleCommand::Authorize(args),
        } => authorize(&args),
        OauthCommand::Test(args) => test(&args),
        OauthCommand::Status(args) => status(&args),
    }
}

fn test(args: &TestArgs) -> anyhow::Result<ExitCode> {
    let config = tsubame_config::Config::load(&args.config)?;
    let name = match &args.upstream {
        Some(name) => name.clone(),
        None => config
            .upstreams
            .iter()
            .find(|upstream| upstream.uses_oauth())
            .map(|upstream| upstream.name.clone())
            .context("no [[upstream]] in the configuration logs in with OAuth (auth = \"xoauth2\" or kind = \"gmail\")")?,
    };
    let (_cache, tokens) = crate::tokens::build(&config)?;
    let hostname = config
        .server
        .hostname
        .clone()
        .unwrap_or_else(tsubame_server::system_hostname);
    match tsubame_relay::check_login(&config, &hostname, &tokens, &name, Some(&args.account)) {
        Ok(said) => {
            println!("upstream {name}: {said}");
            Ok(ExitCode::SUCCESS)
        }
        Err(reason) => {
            eprintln!(
                "upstream {name}: login as {} failed: {reason}",
                args.account
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let config = tsubame_config::Config::load(&args.config)?;
    let spool = args
        .spool
        .clone()
        .unwrap_or_else(|| config.spool.directory.clone());
    let path = crate::tokens::status_path(&spool);
    let live: Option<serde_json::Value> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    let mut rows = Vec::new();
    for upstream in config
        .upstreams
        .iter()
        .filter(|upstream| upstream.uses_oauth())
    {
        let source_name = upstream.oauth.clone().unwrap_or_default();
        let source = config
            .oauth_sources
            .iter()
            .find(|source| source.name == source_name);
        let mut accounts: Vec<String> = upstream
            .account_map
            .iter()
            .map(|mapping| mapping.account.clone())
            .collect();
        accounts.extend(upstream.account.clone());
        accounts.sort();
        accounts.dedup();
        for account in accounts {
            let token_file = source.and_then(|source| source.refresh_token_file(&account));
            let state = live.as_ref().and_then(|live| {
                live["accounts"]
                    .as_array()?
                    .iter()
                    .find(|entry| {
                        entry["source"] == source_name.as_str()
                            && entry["account"] == account.as_str()
                    })
                    .cloned()
            });
            rows.push(serde_json::json!({
                "upstream": upstream.name,
                "source": source_name,
                "account": account,
                "refresh_token_file": token_file.as_ref().map(|path| path.display().to_string()),
                "refresh_token_file_present": token_file.as_ref().map(|path| path.exists()),
                "live": state,
            }));
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "status_file": path.display().to_string(), "server_running_status": live.is_some(), "accounts": rows })
        );
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!(
            "no upstream logs in with OAuth in {}",
            args.config.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if live.is_none() {
        println!(
            "(no live state: is tsubame running with spool {}? it writes {})\n",
            spool.display(),
            path.display()
        );
    }
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    for row in &rows {
        let mut line = format!(
            "{} {} (oauth {})",
            row["upstream"].as_str().unwrap_or_default(),
            row["account"].as_str().unwrap_or_default(),
            row["source"].as_str().unwrap_or_default()
        );
        match row["refresh_token_file_present"].as_bool() {
            Some(true) => line.push_str(", refresh token file present"),
            Some(false) => line.push_str(&format!(
                ", NO refresh token file ({}): run tsubame oauth google authorize",
                row["refresh_token_file"].as_str().unwrap_or_default()
            )),
            None => {}
        }
        let state = &row["live"];
        if state.is_object() {
            match state["expires_at_unix"].as_u64() {
                Some(expires) if state["has_token"] == true => line.push_str(&format!(
                    ", token valid for {} s",
                    expires.saturating_sub(now)
                )),
                _ => line.push_str(", no token"),
            }
            line.push_str(&format!(", {} refreshes", state["refresh_count"]));
            if let Some(error) = state["last_error"].as_str() {
                line.push_str(&format!(", last error: {error}"));
            }
            if state["needs_reauthorization"] == true {
                line.push_str(", RE-AUTHORISATION NEEDED");
            }
        } else if live.is_some() {
            line.push_str(", not used since the server started");
        }
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// What the two waiting threads report.
enum Event {
    Redirect(Result<Secret, AuthorizeError>),
    Pasted(String),
    StdinClosed,
}

fn authorize(args: &AuthorizeArgs) -> anyhow::Result<ExitCode> {
    let client_secret = client_secret(args)?;
    let auth_endpoint = url::Url::parse(&args.auth_endpoint)
        .with_context(|| format!("--auth-endpoint {:?}", args.auth_endpoint))?;
    let token_endpoint = Endpoint::parse(&args.token_endpoint).context("--token-endpoint")?;
    let http = HttpClient::new(HttpSettings::default())?;
    let timeout = Duration::from_secs(args.timeout_secs);

    // Google accepts any port on a loopback redirect URI for a desktop client. Without
    // waiting for the redirect, the port is still a free one, and nothing listens on
    // it: the browser shows an error page at once, whose address is what to paste.
    let receiver = LoopbackReceiver::bind().context("binding the loopback redirect receiver")?;
    let redirect_uri = receiver.redirect_uri();
    let receiver = if args.no_browser_wait {
        drop(receiver);
        None
    } else {
        Some(receiver)
    };
    let authorization = Authorization::new(&args.client_id, &args.account, &redirect_uri)?;
    let consent_url = authorization.consent_url(&auth_endpoint);

    println!(
        "Open this address in a browser, signed in as {}, and allow access:\n\n{consent_url}\n",
        args.account
    );
    if receiver.is_some() {
        println!(
            "Waiting for the browser's redirect to {redirect_uri} (a browser on another \
             machine can reach it through `ssh -L {port}:127.0.0.1:{port} THIS-HOST`).",
            port = redirect_uri_port(&redirect_uri)
        );
    }
    println!(
        "If the browser ends on a page that does not load ({redirect_uri}...), copy that \
         page's whole address from the address bar and paste it here, then press Enter:"
    );

    let (sender, events) = mpsc::channel();
    let receiver_running = receiver.is_some();
    if let Some(receiver) = receiver {
        let sender = sender.clone();
        let state = authorization.state().to_string();
        std::thread::spawn(move || {
            let _ = sender.send(Event::Redirect(receiver.receive(&state, timeout)));
        });
    }
    std::thread::spawn(move || read_pasted_lines(&sender));

    let code = wait_for_code(&authorization, &events, receiver_running, timeout)?;
    let authorized = authorization
        .exchange(
            &http,
            &token_endpoint,
            &client_secret,
            &code,
            SystemTime::now(),
        )
        .context("exchanging the authorisation code")?;
    let token_path = args.token_path();
    token_file::store(&token_path, &authorized.refresh_token)?;
    let token_file = absolute(&token_path);
    println!(
        "\nAuthorised {}. The refresh token is stored in {} (mode 0600); keep that file \
         private, it grants sending mail as the account until revoked.\n",
        args.account,
        token_file.display()
    );
    print!("{}", config_lines(args, &token_file));
    Ok(ExitCode::SUCCESS)
}

fn redirect_uri_port(redirect_uri: &str) -> u16 {
    url::Url::parse(redirect_uri)
        .ok()
        .and_then(|url| url.port())
        .unwrap_or(0)
}

/// Waits for the first usable code from the redirect or a paste. A bad paste is
/// reported and another may follow; a failed redirect leaves the paste.
fn wait_for_code(
    authorization: &Authorization,
    events: &mpsc::Receiver<Event>,
    mut receiver_running: bool,
    timeout: Duration,
) -> anyhow::Result<Secret> {
    let deadline = Instant::now() + timeout;
    let mut stdin_open = true;
    loop {
        if !receiver_running && !stdin_open {
            bail!("no authorisation code: the redirect did not come and standard input closed");
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let event = match events.recv_timeout(left) {
            Ok(event) => event,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!(
                    "no redirect and no pasted code within {} s",
                    timeout.as_secs()
                )
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("no authorisation code")
            }
        };
        match event {
            Event::Redirect(Ok(code)) => {
                println!("Received the browser's redirect.");
                return Ok(code);
            }
            Event::Redirect(Err(error @ AuthorizeError::Denied(_))) => return Err(error.into()),
            Event::Redirect(Err(error)) => {
                receiver_running = false;
                eprintln!("tsubame: the redirect failed: {error}; paste the address instead");
            }
            Event::Pasted(line) => match authorization.code_from_paste(&line) {
                Ok(code) => return Ok(code),
                Err(error @ AuthorizeError::Denied(_)) => return Err(error.into()),
                Err(error) => eprintln!("tsubame: {error}; paste again"),
            },
            Event::StdinClosed => stdin_open = false,
        }
    }
}

/// Sends each non-empty line of standard input, then [`Event::StdinClosed`].
fn read_pasted_lines(sender: &mpsc::Sender<Event>) {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    loop {
        let mut line = Vec::new();
        match (&mut input)
            .take(PASTED_LINE_BYTES_MAX)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line).trim().to_string();
                if !text.is_empty() && sender.send(Event::Pasted(text)).is_err() {
                    return;
                }
            }
        }
    }
    let _ = sender.send(Event::StdinClosed);
}

fn client_secret(args: &AuthorizeArgs) -> anyhow::Result<Secret> {
    let secret = match (&args.client_secret_file, &args.client_secret_env) {
        (Some(path), _) => {
            let mut text = String::new();
            std::fs::File::open(path)
                .and_then(|file| {
                    file.take(CLIENT_SECRET_FILE_BYTES_MAX + 1)
                        .read_to_string(&mut text)
                })
                .with_context(|| format!("reading the client secret file {}", path.display()))?;
            if text.len() as u64 > CLIENT_SECRET_FILE_BYTES_MAX {
                bail!(
                    "the client secret file {} is larger than {CLIENT_SECRET_FILE_BYTES_MAX} bytes",
                    path.display()
                );
            }
            text.trim().to_string()
        }
        (None, Some(variable)) => std::env::var(variable)
            .with_context(|| format!("the environment variable {variable} is not set"))?
            .trim()
            .to_string(),
        (None, None) => bail!("give --client-secret-file or --client-secret-env"),
    };
    if secret.is_empty() {
        bail!("the client secret is empty");
    }
    Ok(Secret::new(secret))
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The configuration that uses the stored token, for the person to paste.
// The key names follow the [[upstream]] OAuth keys of tsubame-config; keep them in step.
impl AuthorizeArgs {
    /// `--token-file`, or the account's file in `--token-directory`.
    fn token_path(&self) -> PathBuf {
        match (&self.token_file, &self.token_directory) {
            (Some(file), _) => file.clone(),
            (None, Some(directory)) => {
                tsubame_config::oauth::token_file_in(directory, &self.account)
            }
            // clap's group makes one of them required.
            (None, None) => PathBuf::from(format!("{}.token", self.account)),
        }
    }
}

/// The `[[oauth]]` source and `[[upstream]]` that use what was just stored.
fn config_lines(args: &AuthorizeArgs, token_file: &Path) -> String {
    let secret_line = match (&args.client_secret_file, &args.client_secret_env) {
        (Some(path), _) => format!(
            "client_secret_file = {:?}\n",
            absolute(path).display().to_string()
        ),
        (None, Some(variable)) => format!("client_secret_env = {variable:?}\n"),
        (None, None) => String::new(),
    };
    let directory = token_file.parent().unwrap_or(Path::new("."));
    let expected = tsubame_config::oauth::token_file_in(directory, &args.account);
    let mut lines = format!(
        "Configuration for the upstream that sends as this account:\n\n\
         [[oauth]]\n\
         name = \"google\"\n\
         kind = \"refresh-token\"\n\
         client_id = {:?}\n\
         {secret_line}\
         token_directory = {:?}\n",
        args.client_id,
        directory.display().to_string()
    );
    if args.token_endpoint != tsubame_oauth::GOOGLE_TOKEN_ENDPOINT {
        lines.push_str(&format!("token_endpoint = {:?}\n", args.token_endpoint));
    }
    lines.push_str(&format!(
        "\n[[upstream]]\n\
         name = \"gmail\"\n\
         kind = \"gmail\"                  # smtp.gmail.com:587, STARTTLS, AUTH XOAUTH2\n\
         oauth = \"google\"\n\
         account = {:?}\n",
        args.account
    ));
    if expected != token_file {
        lines.push_str(&format!(
            "\nThe relay looks for this account's token at {}; move the file there, or run \
             again with --token-directory {}.\n",
            expected.display(),
            directory.display()
        ));
    }
    lines
}
