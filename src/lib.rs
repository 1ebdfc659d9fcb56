//! pgferry: a native Postgres logical-replication CDC engine.
pub mod decode;
pub mod lsn;
pub mod protocol;
