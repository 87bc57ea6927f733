//! MX lookup (RFC 5321 §5.1) with hickory-resolver: placeholder, filled in by the MX work.
