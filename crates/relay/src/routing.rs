//! Which upstream a recipient goes to: the logged-in user's own `upstream` when the
//! account names one; else the first `[[route]]` whose conditions all match; else
//! `[delivery] default_upstream`.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use tsubame_config::{Config, RouteConfig, domain_matches};

/// One compiled `[[route]]`.
#[derive(Debug, Clone)]
struct Rule {
    sender_domains: Vec<String>,
    recipient_domains: Vec<String>,
    users: Vec<String>,
    client_networks: Vec<IpNet>,
    /// Index into the relay's upstream table.
    upstream: usize,
}

/// The routing table. Invariant: every `upstream` index (and `default_upstream`) is
/// below the length of the upstream table it was built against.
#[derive(Debug, Clone)]
pub(crate) struct Router {
    rules: Vec<Rule>,
    default_upstream: usize,
    /// Accounts with an `upstream` of their own.
    user_upstreams: HashMap<String, usize>,
}

/// What a route may look at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouteInput<'a> {
    /// Envelope sender, empty for `<>`.
    pub mail_from: &'a str,
    pub recipient: &'a str,
    pub authenticated_user: Option<&'a str>,
    pub client_ip: Option<IpAddr>,
}

impl<'a> RouteInput<'a> {
    /// What a route may look at for one recipient of a spooled message.
    pub fn of(message: &'a tsubame_spool::SpooledMessage, recipient: &'a str) -> Self {
        let client_ip = message
            .client_address
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|address| address.ip());
        RouteInput {
            mail_from: &message.mail_from,
            recipient,
            authenticated_user: message.authenticated_user.as_deref(),
            client_ip,
        }
    }
}

impl Router {
    /// `index_of` maps an upstream name to its index; configuration validation has
    /// already checked every name exists, so an unknown one falls back to the default.
    pub fn new(config: &Config, index_of: impl Fn(&str) -> Option<usize>) -> Self {
        let default_upstream = index_of(&config.delivery.default_upstream).unwrap_or(0);
        let rules = config
            .routes
            .iter()
            .map(|route: &RouteConfig| Rule {
                sender_domains: route.sender_domains.clone(),
                recipient_domains: route.recipient_domains.clone(),
                users: route.users.clone(),
                client_networks: route.client_networks.clone(),
                upstream: index_of(&route.upstream).unwrap_or(default_upstream),
            })
            .collect();
        let user_upstreams = config
            .users
            .iter()
            .filter_map(|user| {
                let upstream = index_of(user.upstream.as_deref()?)?;
                Some((user.name.clone(), upstream))
            })
            .collect();
        Self {
            rules,
            default_upstream,
            user_upstreams,
        }
    }

    /// The upstream alone (the tests' shorthand for [`Router::route_and_rule`]).
    #[cfg(test)]
    pub fn route(&self, input: &RouteInput<'_>) -> usize {
        self.route_and_rule(input).0
    }

    /// The upstream, and the index of the `[[route]]` that chose it (`None` when the
    /// account's own upstream or `default_upstream` did).
    pub fn route_and_rule(&self, input: &RouteInput<'_>) -> (usize, Option<usize>) {
        if let Some(&upstream) = input
            .authenticated_user
            .and_then(|user| self.user_upstreams.get(user))
        {
            return (upstream, None);
        }
        self.rules
            .iter()
            .position(|rule| rule.matches(input))
            .and_then(|index| Some((self.rules.get(index)?.upstream, Some(index))))
            .unwrap_or((self.default_upstream, None))
    }
}

impl Rule {
    fn matches(&self, input: &RouteInput<'_>) -> bool {
        let domain_in = |patterns: &[String], address: &str| {
            patterns.is_empty()
                || domain_of(address).is_some_and(|domain| {
                    patterns
                        .iter()
                        .any(|pattern| domain_matches(pattern, domain))
                })
        };
        domain_in(&self.sender_domains, input.mail_from)
            && domain_in(&self.recipient_domains, input.recipient)
            && (self.users.is_empty()
                || input
                    .authenticated_user
                    .is_some_and(|user| self.users.iter().any(|allowed| allowed == user)))
            && (self.client_networks.is_empty()
                || input.client_ip.is_some_and(|ip| {
                    self.client_networks
                        .iter()
                        .any(|network| network.contains(&ip))
                }))
    }
}

/// The domain of a mailbox (after the last `@`), or `None` for the null path and
/// addresses without one (`postmaster`).
pub(crate) fn domain_of(address: &str) -> Option<&str> {
    address
        .rsplit_once('@')
        .map(|(_, domain)| domain)
        .filter(|domain| !domain.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(toml: &str) -> Router {
        let config = Config::parse(
            &format!(
                "[[listener]]\naddress = \"127.0.0.1:2525\"\n{toml}\n\
                 [[upstream]]\nname = \"a\"\nkind = \"smtp\"\nhost = \"a.example\"\ntls = \"none\"\n\
                 [[upstream]]\nname = \"b\"\nkind = \"smtp\"\nhost = \"b.example\"\ntls = \"none\"\n"
            ),
            "test",
        )
        .unwrap();
        let names = ["mx", "a", "b"];
        Router::new(&config, |name| names.iter().position(|n| *n == name))
    }

    fn input<'a>(mail_from: &'a str, recipient: &'a str, ip: &str) -> RouteInput<'a> {
        RouteInput {
            mail_from,
            recipient,
            authenticated_user: None,
            client_ip: Some(ip.parse().unwrap()),
        }
    }

    #[test]
    fn first_matching_rule_wins_and_the_default_catches_the_rest() {
        let router = router(
            "[delivery]\ndefault_upstream = \"b\"\n\
             [[route]]\nrecipient_domains = [\".corp.example\", \"corp.example\"]\nupstream = \"a\"\n\
             [[route]]\nsender_domains = [\"news.example\"]\nclient_networks = [\"10.0.0.0/8\"]\nupstream = \"mx\"\n",
        );
        let cases = [
            ("x@y.example", "u@corp.example", "127.0.0.1", 1),
            ("x@y.example", "u@mail.CORP.example", "127.0.0.1", 1),
            ("x@y.example", "u@notcorp.example", "127.0.0.1", 2),
            ("x@news.example", "u@other.example", "10.1.2.3", 0),
            // Both conditions of the second rule must hold.
            ("x@news.example", "u@other.example", "192.0.2.1", 2),
            // The null sender has no domain: a sender_domains rule never matches it.
            ("", "u@other.example", "10.1.2.3", 2),
        ];
        for (from, to, ip, want) in cases {
            assert_eq!(
                router.route(&input(from, to, ip)),
                want,
                "{from} -> {to} from {ip}"
            );
        }
    }

    #[test]
    fn users_condition_needs_an_authenticated_user() {
        let router = router("[[route]]\nusers = [\"scanner\"]\nupstream = \"a\"\n");
        let mut anonymous = input("x@y.example", "u@z.example", "127.0.0.1");
        assert_eq!(router.route(&anonymous), 0);
        anonymous.authenticated_user = Some("scanner");
        assert_eq!(router.route(&anonymous), 1);
    }

    #[test]
    fn a_users_own_upstream_comes_before_the_routes() {
        let hash = tsubame_config::users::hash_password(b"unused").unwrap();
        let router = router(&format!(
            "[[route]]\nupstream = \"a\"\n\
             [[user]]\nname = \"scanner\"\npassword_hash = \"{}\"\nupstream = \"b\"\n\
             [[user]]\nname = \"printer\"\npassword_hash = \"{}\"\n",
            hash.expose(),
            hash.expose()
        ));
        let mut message = input("x@y.example", "u@z.example", "127.0.0.1");
        assert_eq!(router.route(&message), 1);
        message.authenticated_user = Some("scanner");
        assert_eq!(router.route(&message), 2);
        message.authenticated_user = Some("printer");
        assert_eq!(router.route(&message), 1);
    }

    #[test]
    fn domain_of_handles_null_and_local_only_paths() {
        assert_eq!(domain_of("a@b.example"), Some("b.example"));
        assert_eq!(domain_of("\"a@b\"@c.example"), Some("c.example"));
        assert_eq!(domain_of(""), None);
        assert_eq!(domain_of("postmaster"), None);
    }
}
