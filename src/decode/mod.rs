//! Decoding what the walsender sends into pgferry's own representation.
//!
//! - [`types`]: which rendering rule each type OID follows (built-in table plus
//!   catalog lookups for user types).
//! - [`value`]: one column value, in the type's text output form, to JSON text
//!   equal to what Postgres's `to_jsonb()` gives for it.
pub mod types;
pub mod value;
