//! Password checks off the event loops.
//!
//! An argon2id verification takes tens of milliseconds of CPU and 19 MiB of memory: on
//! an event loop it would stall every other session. A loop hands the credentials to
//! this pool with the loop's own channel and waker; a worker checks them and sends the
//! outcome back, and the loop answers the client when the outcome is due (later, when
//! the login guard asked for a delay).

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use mio::{Token, Waker};
use tsubame_config::{Config, VerifyError};
use tsubame_smtp_proto::sasl::Credentials;

/// What became of a login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Accepted,
    /// Wrong password, unknown user, a refused authorization identity: all `535`. The
    /// reason is for the log only.
    Rejected(&'static str),
    /// The login guard refused the attempt without checking it: `454 4.7.0`.
    LockedOut,
    /// The check itself failed (not the client's fault): `454 4.7.0`.
    Unavailable,
}

/// A finished check, on its way back to the loop that asked.
#[derive(Debug)]
pub(crate) struct LoginDone {
    pub token: Token,
    pub connection_id: u64,
    pub username: String,
    pub outcome: Outcome,
    /// Not before this time is the client answered.
    pub answer_at: Instant,
}

#[derive(Debug)]
pub(crate) struct LoginJob {
    pub token: Token,
    pub connection_id: u64,
    pub credentials: Credentials,
    pub answer_at: Instant,
    pub reply: Sender<LoginDone>,
    pub waker: Arc<Waker>,
}

/// The workers; they stop when the pool is dropped.
#[derive(Debug)]
pub(crate) struct LoginPool {
    jobs: Sender<LoginJob>,
}

impl LoginPool {
    pub fn start(config: Arc<Config>, threads: usize) -> std::io::Result<Self> {
        let (jobs, queue) = crossbeam_channel::unbounded::<LoginJob>();
        for index in 0..threads.max(1) {
            let queue = queue.clone();
            let config = Arc::clone(&config);
            std::thread::Builder::new()
                .name(format!("login-{index}"))
                .spawn(move || work(&config, &queue))?;
        }
        Ok(Self { jobs })
    }

    /// Queues a check. Each connection has at most one in flight, so the queue is
    /// bounded by the number of connections. Fails only when every worker has died;
    /// the job (with the user name for the log) comes back.
    pub fn submit(&self, job: LoginJob) -> Result<(), Box<LoginJob>> {
        self.jobs.send(job).map_err(|error| Box::new(error.0))
    }
}

fn work(config: &Config, queue: &Receiver<LoginJob>) {
    while let Ok(job) = queue.recv() {
        let LoginJob {
            token,
            connection_id,
            credentials,
            answer_at,
            reply,
            waker,
        } = job;
        let verified = config
            .users
            .verify(&credentials.username, credentials.password().expose());
        let outcome = match verified {
            // Acting as someone else (RFC 4616 authzid) is not supported; refused with
            // the same reply as a wrong password, after the same work.
            Ok(_) if credentials.authzid.is_some() => {
                Outcome::Rejected("authorization identity refused")
            }
            Ok(_) => Outcome::Accepted,
            Err(VerifyError::UnknownUser) => Outcome::Rejected("unknown user"),
            Err(VerifyError::WrongPassword) => Outcome::Rejected("wrong password"),
            Err(VerifyError::PasswordTooLong) => Outcome::Rejected("password too long"),
            Err(VerifyError::Internal { reason }) => {
                tracing::error!(%reason, "cannot check a password");
                Outcome::Unavailable
            }
        };
        let done = LoginDone {
            token,
            connection_id,
            username: credentials.username.clone(),
            outcome,
            answer_at,
        };
        drop(credentials);
        if reply.send(done).is_ok() {
            let _ = waker.wake();
        }
    }
}
