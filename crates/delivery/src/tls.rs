//! rustls client configuration for STARTTLS and implicit TLS: placeholder, filled in by the TLS work.
