//! pgferry: a native Postgres logical-replication CDC engine.
pub mod lsn;
pub mod protocol;
