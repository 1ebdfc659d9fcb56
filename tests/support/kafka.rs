//! One real Apache Kafka 4.x broker per test binary (see `tests/kafka/`): KRaft
//! mode, one JVM that is both broker and controller, started on first use on a
//! free loopback port with a temporary home. Internal topics have replication
//! factor 1, so transactions and consumer groups work on this one node.
//!
//! The JVM runs under [`super::watchdog`], so it dies with the test binary,
//! even on SIGKILL. Tests share the broker and use their own topic names and
//! transactional ids. A test that stops or kills the broker
//! ([`Broker::exclusive`]) holds the write side of a lock that every other
//! test holds the read side of ([`Broker::shared`]); [`Broker::start`] brings
//! it back on the same port with its data.

use std::collections::{HashMap, HashSet};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::Value;

use super::watchdog::Guarded;

pub struct Broker {
    pub port: u16,
    home: tempfile::TempDir,
    proc: Mutex<Option<Guarded>>,
    lock: RwLock<()>,
}

/// The broker of this test binary, started on first use.
pub fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(|| {
        super::jvm::build("kafka");
        let b = Broker {
            port: super::pg::free_port(),
            home: tempfile::Builder::new()
                .prefix("pgferry-kafka-")
                .tempdir()
                .unwrap(),
            proc: Mutex::new(None),
            lock: RwLock::new(()),
        };
        b.start();
        b
    })
}

impl Broker {
    /// The `bootstrap.servers` value.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// For tests that leave the broker running.
    pub fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().unwrap_or_else(|e| e.into_inner())
    }

    /// For a test that stops the broker: no other test runs meanwhile.
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the JVM (same port, same home and data) and waits until the
    /// broker is unfenced and accepts connections.
    pub fn start(&self) {
        let t = Instant::now();
        let mut slot = self.proc.lock().unwrap();
        assert!(slot.is_none(), "the Kafka broker is already running");
        let home = self.home();
        let _ = std::fs::remove_file(home.join("ready"));
        let mut args: Vec<String> = std::env::var("KAFKA_JAVA_OPTS")
            .unwrap_or_else(|_| "-Xms256m -Xmx512m".into())
            .split_whitespace()
            .map(String::from)
            .collect();
        args.extend([
            "-cp".into(),
            super::jvm::classpath("kafka"),
            "Launcher".into(),
            home.display().to_string(),
            self.port.to_string(),
        ]);
        let proc = Guarded::spawn("java", &args, &home.join("node.log"), home);
        let deadline = Instant::now() + Duration::from_secs(180);
        while !(home.join("ready").exists() && TcpStream::connect(self.bootstrap()).is_ok()) {
            assert!(
                proc.alive() && Instant::now() < deadline,
                "Kafka did not start; end of its log:\n{}",
                proc.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        *slot = Some(proc);
        eprintln!(
            "kafka broker up on {} in {:?}",
            self.bootstrap(),
            t.elapsed()
        );
    }

    /// Kills the JVM with SIGKILL, as a crash would, and waits until it is gone.
    pub fn kill(&self) {
        if let Some(p) = self.proc.lock().unwrap().take() {
            p.kill();
        }
    }

    /// A clean shutdown (SIGTERM: the broker closes its logs), SIGKILL after 60 s.
    pub fn stop(&self) {
        if let Some(p) = self.proc.lock().unwrap().take() {
            p.stop(Duration::from_secs(60));
        }
    }

    /// Freezes the JVM (SIGSTOP): connections stay open, replies stop.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused JVM (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let g = self.proc.lock().unwrap();
        g.as_ref()
            .expect("the Kafka broker is not running")
            .signal(sig);
    }

    /// The last lines of the broker's log.
    pub fn log_tail(&self) -> String {
        super::watchdog::log_tail(&self.home().join("node.log"), 40)
    }
}

/// One record as a `read_committed` consumer saw it.
#[derive(Debug, Clone)]
pub struct Rec {
    pub topic: String,
    pub partition: i32,
    pub key: Option<String>,
    pub value: Option<Value>,
    pub headers: HashMap<String, String>,
}

/// Every committed record of the topics starting with `prefix.`, read from
/// the beginning with `isolation.level=read_committed`.
pub fn read_topics(prefix: &str) -> Vec<Rec> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker().bootstrap())
        .set("group.id", "kafka-sink-test")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(30))
        .unwrap();
    let mut out = Vec::new();
    for t in md.topics() {
        if t.name().starts_with(&format!("{prefix}.")) {
            read_topic(&consumer, t.name(), t.partitions().len(), &mut out);
        }
    }
    out
}

/// One topic, to the end of each of its partitions (one topic at a time:
/// the end-of-partition event names only the partition).
pub fn read_topic(consumer: &BaseConsumer, topic: &str, partitions: usize, out: &mut Vec<Rec>) {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut at_end = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while at_end.len() < partitions {
        assert!(Instant::now() < deadline, "reading {topic} took too long");
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                let v = String::from_utf8(h.value.unwrap_or_default().to_vec());
                                (h.key.to_string(), v.unwrap())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Rec {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    key: m.key().map(|k| String::from_utf8(k.to_vec()).unwrap()),
                    value: m.payload().map(|v| serde_json::from_slice(v).unwrap()),
                    headers,
                });
            }
        }
    }
    consumer.unassign().unwrap();
}
