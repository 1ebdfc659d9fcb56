//! Shared harness for the integration tests: throwaway servers started by the
//! test itself, never a service already running on the machine.
#![allow(dead_code)]

pub mod ferry;
pub mod iceberg;
pub mod jvm;
pub mod kafka;
pub mod nats;
pub mod opensearch;
pub mod pg;
pub mod redis;
pub mod rng;
pub mod tls_proxy;
pub mod types_fixture;
pub mod watchdog;
pub mod workload;
