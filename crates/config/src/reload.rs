//! What a running relay can take from a reloaded configuration (SIGHUP), and what
//! stays as it started until a restart.

use crate::Config;

impl Config {
    /// Sets the settings of `new` that a running relay cannot change to their values in
    /// `self` (the configuration in force), and names each one that differed, for a
    /// warning. Everything else in `new` (routes, upstreams, users, limits, relay
    /// networks, auth requirements, rate limits, the login guard, DKIM keys) can go in
    /// force as it is.
    ///
    /// Restart-only, and why:
    /// * listener addresses, count, modes and certificate files: the sockets are bound
    ///   and the TLS files chosen at start (SIGHUP re-reads the same files);
    /// * the spool directory and segment size: the spool is open and locked;
    /// * `server.threads` and `server.hostname`: the event loops are running and greet
    ///   with the name they have;
    /// * `[log]`: the log writer is set up before anything else;
    /// * `[delivery_log]`: its file is open;
    /// * `[admin]`: the admin HTTP server is bound, with its token, at start;
    /// * `[[oauth]]`: the token sources and their status thread are started once;
    /// * the retry schedule, `max_age_secs`, `signing_threads` and
    ///   `shutdown_timeout_secs` of `[delivery]`: the scheduler, the signing pool and
    ///   the stop sequence are set up with them;
    /// * `auth.login_cache_secs`: the login cache is made with its period.
    pub fn keep_restart_only(&self, new: &mut Config) -> Vec<&'static str> {
        let mut kept = Vec::new();
        let same_listeners = self.listeners.len() == new.listeners.len()
            && self
                .listeners
                .iter()
                .zip(&new.listeners)
                .all(|(old, wanted)| {
                    old.address == wanted.address
                        && old.mode == wanted.mode
                        && old.certificate_file == wanted.certificate_file
                        && old.key_file == wanted.key_file
                });
        if !same_listeners {
            kept.push("listener addresses, modes and certificate files");
            if self.listeners.len() == new.listeners.len() {
                for (old, wanted) in self.listeners.iter().zip(&mut new.listeners) {
                    wanted.address = old.address;
                    wanted.mode = old.mode;
                    wanted.certificate_file.clone_from(&old.certificate_file);
                    wanted.key_file.clone_from(&old.key_file);
                }
            } else {
                new.listeners.clone_from(&self.listeners);
            }
        }
        keep(&mut kept, "spool", &self.spool, &mut new.spool);
        keep(
            &mut kept,
            "server.threads",
            &self.server.threads,
            &mut new.server.threads,
        );
        keep(
            &mut kept,
            "server.hostname",
            &self.server.hostname,
            &mut new.server.hostname,
        );
        keep(&mut kept, "log", &self.log, &mut new.log);
        keep(
            &mut kept,
            "delivery_log",
            &self.delivery_log,
            &mut new.delivery_log,
        );
        keep(&mut kept, "admin", &self.admin, &mut new.admin);
        keep(
            &mut kept,
            "oauth",
            &self.oauth_sources,
            &mut new.oauth_sources,
        );
        let (old, wanted) = (&self.delivery, &mut new.delivery);
        let same_retry = old.retry_initial_secs == wanted.retry_initial_secs
            && old.retry_factor == wanted.retry_factor
            && old.retry_max_secs == wanted.retry_max_secs
            && old.retry_schedule_secs == wanted.retry_schedule_secs;
        if !same_retry {
            kept.push("delivery retry schedule (retry_*)");
            wanted.retry_initial_secs = old.retry_initial_secs;
            wanted.retry_factor = old.retry_factor;
            wanted.retry_max_secs = old.retry_max_secs;
            wanted
                .retry_schedule_secs
                .clone_from(&old.retry_schedule_secs);
        }
        keep(
            &mut kept,
            "delivery.max_age_secs",
            &old.max_age_secs,
            &mut wanted.max_age_secs,
        );
        keep(
            &mut kept,
            "delivery.signing_threads",
            &old.signing_threads,
            &mut wanted.signing_threads,
        );
        keep(
            &mut kept,
            "delivery.shutdown_timeout_secs",
            &old.shutdown_timeout_secs,
            &mut wanted.shutdown_timeout_secs,
        );
        keep(
            &mut kept,
            "auth.login_cache_secs",
            &self.auth.login_cache_secs,
            &mut new.auth.login_cache_secs,
        );
        kept
    }
}

/// Puts `old` back into `wanted` when they differ, noting `name`.
fn keep<T: PartialEq + Clone>(
    kept: &mut Vec<&'static str>,
    name: &'static str,
    old: &T,
    wanted: &mut T,
) {
    if old != wanted {
        kept.push(name);
        wanted.clone_from(old);
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    const BASE: &str = r#"
[[listener]]
address = "127.0.0.1:2525"

[delivery]
default_upstream = "a"

[[upstream]]
name = "a"
kind = "smtp"
host = "a.example"
port = 25

[[upstream]]
name = "b"
kind = "smtp"
host = "b.example"
port = 25
"#;

    fn parsed(extra: &str) -> Config {
        Config::parse(&format!("{BASE}{extra}"), "test").unwrap()
    }

    #[test]
    fn what_a_reload_changes_and_what_waits_for_a_restart() {
        // (what the new file adds, the restart-only settings named)
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            (
                "[[route]]\nrecipient_domains = [\"example.org\"]\nupstream = \"b\"\n",
                &[],
            ),
            ("[limits]\nmax_recipients = 200\n", &[]),
            ("[rate_limits.per_client]\nmessages_per_minute = 10\n", &[]),
            ("[server]\nthreads = 3\n", &["server.threads"]),
            ("[spool]\ndirectory = \"/elsewhere\"\n", &["spool"]),
            ("[log]\nlevel = \"debug\"\n", &["log"]),
            ("[delivery_log]\nenabled = false\n", &["delivery_log"]),
            ("[admin]\nenabled = true\n", &["admin"]),
            ("[auth]\nlogin_cache_secs = 5\n", &["auth.login_cache_secs"]),
            (
                "[[listener]]\naddress = \"127.0.0.1:2526\"\n",
                &["listener addresses, modes and certificate files"],
            ),
        ];
        let old = parsed("");
        for (extra, expected) in cases {
            let mut new = match Config::parse(&format!("{BASE}{extra}"), "test") {
                Ok(config) => config,
                Err(error) => panic!("{extra:?}: {error}"),
            };
            let kept = old.keep_restart_only(&mut new);
            assert_eq!(&kept, expected, "{extra:?}");
            // What stays is the old value.
            assert_eq!(new.server, old.server, "{extra:?}");
            assert_eq!(new.spool, old.spool, "{extra:?}");
            assert_eq!(new.listeners, old.listeners, "{extra:?}");
            assert_eq!(new.log, old.log, "{extra:?}");
            assert_eq!(new.delivery_log, old.delivery_log, "{extra:?}");
            assert_eq!(new.admin, old.admin, "{extra:?}");
        }
    }

    #[test]
    fn listener_policy_reloads_but_its_address_does_not() {
        let old = parsed("");
        let mut new = Config::parse(
            &BASE.replace(
                "address = \"127.0.0.1:2525\"",
                "address = \"127.0.0.1:2600\"\nrequire_auth = true\nrequire_tls_for_auth = false",
            ),
            "test",
        )
        .unwrap();
        let kept = old.keep_restart_only(&mut new);
        assert_eq!(kept, ["listener addresses, modes and certificate files"]);
        assert_eq!(new.listeners[0].address, old.listeners[0].address);
        assert!(new.listeners[0].require_auth, "the policy is the new one");
    }

    #[test]
    fn a_changed_retry_schedule_keeps_the_old_one() {
        let old = parsed("");
        let mut new = Config::parse(
            &BASE.replace(
                "default_upstream = \"a\"",
                "default_upstream = \"b\"\nretry_schedule_secs = [60, 600]\nmax_age_secs = 7200",
            ),
            "test",
        )
        .unwrap();
        let kept = old.keep_restart_only(&mut new);
        assert_eq!(
            kept,
            ["delivery retry schedule (retry_*)", "delivery.max_age_secs"]
        );
        assert_eq!(new.delivery.retry_schedule_secs, None);
        assert_eq!(new.delivery.max_age_secs, old.delivery.max_age_secs);
        assert_eq!(new.delivery.default_upstream, "b", "reloadable");
    }
}
