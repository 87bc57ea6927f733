//! Live SMTP conversations for an administrator watching one device (`tsubame trace`).
//!
//! The event loops report each command line they receive and each reply they send to an
//! [`Observer`], but only for a connection the observer says it is [watching]: with no
//! watcher the cost is one relaxed atomic load per connection event. What is reported
//! never holds a password or message content: AUTH responses are replaced by `***`, and
//! a message's content is reported as its size.
//!
//! [watching]: Observer::watching

use std::net::{IpAddr, SocketAddr};

/// Who said a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The client's command (or AUTH response, redacted).
    Client,
    /// Our reply.
    Server,
    /// Something that is neither: connected, TLS established, logged in, closed.
    Note,
}

impl Direction {
    /// The marker a transcript shows: `C:`, `S:` or `*`.
    pub fn marker(self) -> &'static str {
        match self {
            Direction::Client => "C:",
            Direction::Server => "S:",
            Direction::Note => "*",
        }
    }
}

/// Receives the conversations someone is watching. Called on event-loop threads: both
/// methods must return quickly and never block on I/O.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// Whether any watcher wants the conversation of this client address or logged-in
    /// user. Called often; must be cheap when nobody watches.
    fn watching(&self, client: IpAddr, user: Option<&str>) -> bool;
    /// One line of a watched conversation, without its CRLF.
    fn line(&self, client: SocketAddr, user: Option<&str>, direction: Direction, text: &str);
}

/// The observer when nothing can watch (tests, embedding).
#[derive(Debug, Default, Clone, Copy)]
pub struct Nobody;

impl Observer for Nobody {
    fn watching(&self, _client: IpAddr, _user: Option<&str>) -> bool {
        false
    }

    fn line(&self, _client: SocketAddr, _user: Option<&str>, _direction: Direction, _text: &str) {}
}
