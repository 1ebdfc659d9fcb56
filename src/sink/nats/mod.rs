//! The NATS JetStream sink (`type = "nats"`): publishes the event log
//! ([`crate::sink::eventlog`]) to JetStream subjects, effectively-once
//! through JetStream's message deduplication and a position read back from
//! the stream's last message (see [`sink`]).

pub mod config;
pub mod sink;
pub mod subjects;

pub use config::NatsConfig;
pub use sink::NatsSink;
