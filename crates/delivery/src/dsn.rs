//! Delivery status notifications (RFC 3464): placeholder, filled in by the bounce work.
