//! Shared harness for the integration tests: throwaway servers started by the
//! test itself, never a service already running on the machine.
#![allow(dead_code)]

pub mod fault_proxy;
pub mod ferry;
pub mod http;
pub mod iceberg;
pub mod jvm;
pub mod kafka;
pub mod nats;
pub mod opensearch;
pub mod oracle;
pub mod pg;
pub mod progress;
pub mod proxy;
pub mod redis;
pub mod rng;
pub mod tls_proxy;
pub mod types_fixture;
pub mod watchdog;
pub mod workload;

/// A one-worker tokio runtime for a test proxy, and a listener on a free
/// loopback port: (runtime, listener, port).
pub fn proxy_listener() -> (tokio::runtime::Runtime, tokio::net::TcpListener, u16) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    (rt, listener, port)
}
