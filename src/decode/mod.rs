//! Decoding what the walsender sends into pgferry's own representation.
//! No network I/O happens here: the connection layer loads missing type
//! information before it hands over a Relation message.
//!
//! - [`types`]: which rendering rule each type OID follows (built-in table plus
//!   catalog lookups for user types).
//! - [`value`]: one column value, in the type's text output form, to JSON text
//!   equal to what Postgres's `to_jsonb()` gives for it.
//! - [`routes`]: which relations are configured tables, followed by OID
//!   through renames and replaced on DROP + CREATE.
//! - [`assembler`]: pgoutput messages in, committed transactions out (streamed
//!   transactions, aborts, spill to disk).

pub mod assembler;
pub mod binary;
pub mod routes;
pub mod types;
pub mod value;
