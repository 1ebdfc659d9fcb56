//! The servers that the event-log sinks will be tested against, checked on
//! their own: the embedded Kafka broker (`support::kafka`) answers the Kafka
//! protocol with the transaction APIs, and Debian's `nats-server -js`
//! (`support::nats`) has JetStream. Both come back after a SIGKILL with their
//! data, as the sinks' crash tests will need.
//!
//! No Kafka or NATS client library is used: the few requests are written by
//! hand from the protocol specifications, so this harness stays independent of
//! the sinks' own clients.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

/// Kafka's ApiVersions (key 18) at version 0: the (key, min, max) of every API
/// the broker serves.
fn kafka_api_versions(bootstrap: &str) -> Vec<(i16, i16, i16)> {
    let mut s = TcpStream::connect(bootstrap).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let client_id = b"pgferry-harness";
    let mut req = Vec::new();
    req.extend(18i16.to_be_bytes()); // api key
    req.extend(0i16.to_be_bytes()); // api version
    req.extend(7i32.to_be_bytes()); // correlation id
    req.extend((client_id.len() as i16).to_be_bytes());
    req.extend(client_id);
    s.write_all(&(req.len() as i32).to_be_bytes()).unwrap();
    s.write_all(&req).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut resp = vec![0u8; i32::from_be_bytes(len) as usize];
    s.read_exact(&mut resp).unwrap();
    let i16_at = |o: usize| i16::from_be_bytes([resp[o], resp[o + 1]]);
    let i32_at = |o: usize| i32::from_be_bytes(resp[o..o + 4].try_into().unwrap());
    assert_eq!(i32_at(0), 7, "correlation id");
    assert_eq!(i16_at(4), 0, "ApiVersions error code");
    (0..i32_at(6) as usize)
        .map(|i| {
            let o = 10 + 6 * i;
            (i16_at(o), i16_at(o + 2), i16_at(o + 4))
        })
        .collect()
}

#[test]
fn kafka_broker_serves_transactions_and_survives_sigkill() {
    let b = support::kafka::broker();
    let _x = b.exclusive();
    let apis = kafka_api_versions(&b.bootstrap());
    // Produce, Fetch, InitProducerId, AddPartitionsToTxn, EndTxn, TxnOffsetCommit.
    for key in [0, 1, 22, 24, 26, 28] {
        assert!(
            apis.iter().any(|a| a.0 == key),
            "API {key} missing: {apis:?}"
        );
    }
    let meta = std::fs::read_to_string(b.home().join("data/meta.properties")).unwrap();
    assert!(meta.contains("cluster.id="), "{meta}");

    b.kill();
    assert!(
        TcpStream::connect(b.bootstrap()).is_err(),
        "the broker still accepts connections after SIGKILL"
    );
    b.start();
    assert_eq!(kafka_api_versions(&b.bootstrap()), apis);
    // The same storage, not a re-formatted one.
    let again = std::fs::read_to_string(b.home().join("data/meta.properties")).unwrap();
    assert_eq!(meta, again);
}

/// A NATS connection speaking the text protocol: enough for JetStream API requests.
struct NatsConn {
    r: BufReader<TcpStream>,
    w: TcpStream,
    info: Value,
}

impl NatsConn {
    fn connect(url: &str) -> NatsConn {
        let addr = url.trim_start_matches("nats://");
        let w = TcpStream::connect(addr).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut r = BufReader::new(w.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let info = serde_json::from_str(line.trim_end().strip_prefix("INFO ").unwrap()).unwrap();
        let mut c = NatsConn { r, w, info };
        c.send("CONNECT {\"verbose\":false,\"headers\":true}\r\nSUB _INBOX.h 1\r\n");
        c
    }

    fn send(&mut self, s: &str) {
        self.w.write_all(s.as_bytes()).unwrap();
    }

    /// One request/reply on `subject`; the reply's JSON body.
    fn request(&mut self, subject: &str, body: &str) -> Value {
        self.send(&format!(
            "PUB {subject} _INBOX.h {}\r\n{body}\r\n",
            body.len()
        ));
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).unwrap();
            if line.starts_with("PING") {
                self.send("PONG\r\n");
            } else if let Some(rest) = line.strip_prefix("MSG ") {
                let n: usize = rest.split_whitespace().last().unwrap().parse().unwrap();
                let mut payload = vec![0u8; n + 2];
                self.r.read_exact(&mut payload).unwrap();
                return serde_json::from_slice(&payload[..n]).unwrap();
            } else {
                assert!(!line.starts_with("-ERR"), "{line}");
            }
        }
    }
}

#[test]
fn nats_server_has_jetstream_and_keeps_streams_across_sigkill() {
    let mut n = support::nats::TestNats::new();
    let mut c = NatsConn::connect(&n.url());
    assert_eq!(c.info["jetstream"], Value::Bool(true), "{}", c.info);
    let created = c.request(
        "$JS.API.STREAM.CREATE.HARNESS",
        r#"{"name":"HARNESS","subjects":["harness.>"],"storage":"file","duplicate_window":120000000000}"#,
    );
    assert!(created.get("error").is_none(), "{created}");
    let ack = c.request("harness.a", "{\"x\":1}");
    assert_eq!(ack["stream"], "HARNESS", "{ack}");
    assert_eq!(ack["seq"], 1, "{ack}");

    n.kill();
    n.start();
    let mut c = NatsConn::connect(&n.url());
    let info = c.request("$JS.API.STREAM.INFO.HARNESS", "");
    assert_eq!(info["state"]["messages"], 1, "{info}\n{}", n.log_tail());
    assert_eq!(
        info["config"]["duplicate_window"], 120_000_000_000u64,
        "{info}"
    );
}
