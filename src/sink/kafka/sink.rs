use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};

use super::config::KafkaConfig;
use super::position::{self, PositionRecord};
use crate::event::Transaction;
use crate::sink::eventlog::{route, Encoder, EncoderOptions, Position, Record};
use crate::sink::{Sink, SinkError, StreamOwner, TableFilter};

/// Delivery reports: the first failure (for the at-least-once mode; in a
/// transaction `commit_transaction` reports it as well) and how many
/// records still wait for theirs.
#[derive(Clone, Default)]
struct Deliveries {
    failed: Arc<Mutex<Option<KafkaError>>>,
    /// Records queued and not yet reported, and its wake-up.
    pending: Arc<(Mutex<u64>, Condvar)>,
}

impl Deliveries {
    fn queued(&self) {
        *self.pending.0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    /// One record fewer to wait for.
    fn reported(&self) {
        let (lock, cv) = &*self.pending;
        let mut n = lock.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            cv.notify_all();
        }
    }

    /// Waits until every queued record has its delivery report (the
    /// producer's polling thread serves them as they come). `false` on
    /// timeout. rust-rdkafka's own `flush` polls in 100 ms slices and can
    /// lose the race for each report to that thread, so a thin stream paid
    /// about 100 ms per batch.
    fn wait_all(&self, timeout: Duration) -> bool {
        let (lock, cv) = &*self.pending;
        let deadline = Instant::now() + timeout;
        let mut n = lock.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            n = cv
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            f.get_or_insert_with(|| e.clone());
        }
        self.reported();
    }
}

/// The Kafka sink. The Kafka clients make blocking calls, so the state
/// lives in [`Inner`] and each batch runs on a blocking thread.
pub struct KafkaSink {
    cfg: Arc<KafkaConfig>,
    owner: StreamOwner,
    rt: tokio::runtime::Handle,
    /// `None` while a batch runs (or after a batch was abandoned mid-way:
    /// then a fresh one is made, which reconnects and re-reads the position).
    inner: Option<Box<Inner>>,
}

impl KafkaSink {
    /// Builds the sink and, best effort, connects: with `exactly_once` the
    /// producer's `init_transactions` fences any other pgferry using this
    /// sink's name at once. A broker that is down now is retried by the
    /// first batch; only a fatal error (fenced, not authorised) fails here.
    pub async fn open(cfg: Arc<KafkaConfig>, owner: StreamOwner) -> Result<KafkaSink, SinkError> {
        if cfg.exactly_once {
            tracing::info!(sink = %cfg.name, transactional_id = %cfg.transactional_id(),
                "kafka sink: exactly_once: each batch is one Kafka transaction; read_committed consumers see every change once");
        } else {
            tracing::warn!(sink = %cfg.name,
                "kafka sink: exactly_once = false: idempotent producer, AT-LEAST-ONCE: after a crash or a broker outage, changes since the last checkpoint can be published again");
        }
        let rt = tokio::runtime::Handle::current();
        let mut sink = KafkaSink {
            inner: Some(Box::new(Inner::new(&cfg, &owner, rt.clone()))),
            cfg,
            owner,
            rt,
        };
        let res = sink.run(|inner| inner.connect()).await;
        match res {
            Err(e) if !e.is_transient() => Err(e),
            Err(e) => {
                tracing::warn!(sink = %sink.cfg.name, error = %e, "kafka not reachable yet; the first batch retries");
                Ok(sink)
            }
            Ok(()) => Ok(sink),
        }
    }

    /// Runs `f` on the state, on a blocking thread.
    async fn run(
        &mut self,
        f: impl FnOnce(&mut Inner) -> Result<(), SinkError> + Send + 'static,
    ) -> Result<(), SinkError> {
        let mut inner = match self.inner.take() {
            Some(i) => i,
            None => Box::new(Inner::new(&self.cfg, &self.owner, self.rt.clone())),
        };
        let (inner, res) = tokio::task::spawn_blocking(move || {
            let res = f(&mut inner);
            if res.is_err() {
                // Reconnect next time: a new producer aborts what this one
                // left open, and the position is read again.
                inner.conn = None;
            }
            (inner, res)
        })
        .await
        .map_err(|e| SinkError::transient(format!("kafka sink task failed: {e}")))?;
        self.inner = Some(inner);
        res
    }
}

#[async_trait::async_trait]
impl Sink for KafkaSink {
    async fn apply(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError> {
        let started = Instant::now();
        let age_ms = batch.first().map(|t| commit_age_ms(t.meta.commit_time));
        let n = batch.len();
        let batch = batch.to_vec();
        let res = self.run(move |inner| inner.apply(&batch)).await;
        tracing::debug!(sink = %self.cfg.name, txns = n, first_commit_age_ms = ?age_ms,
            apply_ms = started.elapsed().as_secs_f64() * 1e3, "kafka batch");
        res
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        if let Some(inner) = self.inner.take() {
            // Dropping the clients waits for their threads: off the executor.
            let _ = tokio::task::spawn_blocking(move || drop(inner)).await;
        }
        Ok(())
    }
}

/// Milliseconds since a commit time (microseconds since 2000-01-01 UTC).
fn commit_age_ms(commit_time: i64) -> f64 {
    const PG_EPOCH_US: i64 = 946_684_800_000_000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    (now - PG_EPOCH_US - commit_time) as f64 / 1e3
}

/// The connected clients.
struct Conn {
    producer: ThreadedProducer<Deliveries>,
    deliveries: Deliveries,
    admin: Option<AdminClient<DefaultClientContext>>,
    /// With `exactly_once`: the last record Kafka holds (committed).
    position: Option<Position>,
}

/// The sink's state, used on a blocking thread.
struct Inner {
    cfg: Arc<KafkaConfig>,
    owner: StreamOwner,
    rt: tokio::runtime::Handle,
    encoder: Encoder,
    conn: Option<Conn>,
    /// Topics known to exist (created or found).
    topics: HashSet<String>,
}

impl Inner {
    fn new(cfg: &Arc<KafkaConfig>, owner: &StreamOwner, rt: tokio::runtime::Handle) -> Inner {
        let encoder = Encoder::new(
            EncoderOptions {
                format: cfg.format,
                dest: cfg.topic.clone(),
                overrides: cfg.overrides(),
                tables: TableFilter::new(cfg.table_names()),
                tombstones: cfg.tombstones,
                sink: cfg.name.clone(),
                valid_char: route::kafka_topic_char,
            },
            owner.clone(),
        );
        Inner {
            cfg: cfg.clone(),
            owner: owner.clone(),
            rt,
            encoder,
            conn: None,
            topics: HashSet::new(),
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.cfg.timeout_secs)
    }

    /// The properties every client gets: the brokers and the passthrough.
    fn base_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.cfg.brokers);
        for (k, v) in &self.cfg.kafka {
            c.set(k, v.text());
        }
        c
    }

    /// Connects unless connected: creates the producer, and with
    /// `exactly_once` initialises transactions (fencing any older producer
    /// with the same `transactional.id`, and aborting what it left open),
    /// then reads the last committed position.
    fn connect(&mut self) -> Result<(), SinkError> {
        if self.conn.is_some() {
            return Ok(());
        }
        let base = self.base_config();
        let mut pc = base.clone();
        pc.set("enable.idempotence", "true");
        if self.cfg.exactly_once {
            pc.set("transactional.id", self.cfg.transactional_id());
        }
        let deliveries = Deliveries::default();
        let producer: ThreadedProducer<Deliveries> = pc
            .create_with_context(deliveries.clone())
            .map_err(|e| self.fail("creating the producer", &e))?;
        let admin: Option<AdminClient<DefaultClientContext>> = if self.cfg.create_topics {
            Some(
                base.create()
                    .map_err(|e| self.fail("creating the admin client", &e))?,
            )
        } else {
            None
        };
        let mut conn = Conn {
            producer,
            deliveries,
            admin,
            position: None,
        };
        if self.cfg.exactly_once {
            conn.producer
                .init_transactions(self.timeout())
                .map_err(|e| self.fail("initialising transactions", &e))?;
            let topic = self.cfg.position_topic();
            if let Some(admin) = &conn.admin {
                position::create_topic(
                    admin,
                    &self.rt,
                    &topic,
                    Some(1),
                    self.cfg.replication_factor,
                    &[("cleanup.policy", "compact"), ("segment.ms", "3600000")],
                    self.timeout(),
                )
                .map_err(|e| self.fail(&format!("creating topic {topic}"), &e))?;
            }
            conn.position = self.read_position(&base)?;
            tracing::info!(sink = %self.cfg.name, position = ?conn.position.map(|p| p.to_text()),
                "kafka sink: transactions initialised; records at or before the committed position are skipped");
        }
        self.conn = Some(conn);
        Ok(())
    }

    /// The last committed position of this sink, checked to belong to our
    /// stream.
    fn read_position(&self, base: &ClientConfig) -> Result<Option<Position>, SinkError> {
        let topic = self.cfg.position_topic();
        let consumer: BaseConsumer = position::consumer_config(base)
            .create()
            .map_err(|e| self.fail("creating the position reader", &e))?;
        let Some(rec) = position::read_last(&consumer, &topic, self.timeout())
            .map_err(|e| self.fail(&format!("reading the position from {topic}"), &e))?
        else {
            return Ok(None);
        };
        let mine =
            rec.system_identifier == self.owner.system_identifier && rec.slot == self.owner.slot;
        match rec.parsed() {
            Some(p) if mine => Ok(Some(p)),
            Some(_) => Err(SinkError::fatal(format!(
                "topic {topic} holds the position of another change stream (server {}, slot {:?}; this pgferry follows server {}, slot {:?}). \
                 Two pgferry instances must not share a Kafka sink name: rename this sink, or delete topic {topic} if the old stream is gone for good \
                 (its records would then be published again from this stream's checkpoint)",
                rec.system_identifier, rec.slot, self.owner.system_identifier, self.owner.slot
            ))),
            None => Err(SinkError::fatal(format!(
                "topic {topic} holds an unreadable position {:?}; delete the topic to publish again from the checkpoint",
                rec.position
            ))),
        }
    }

    /// Publishes a batch: with `exactly_once` as one Kafka transaction with
    /// its position record, skipping what Kafka already holds; otherwise
    /// queued and flushed.
    fn apply(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError> {
        self.connect()?;
        let eo = self.cfg.exactly_once;
        let timeout = self.timeout();
        let max = self.cfg.max_message_bytes();
        let mut out = Out {
            conn: self.conn.as_mut().expect("connected"),
            cfg: &self.cfg,
            rt: &self.rt,
            topics: &mut self.topics,
            open: false,
            last: None,
            max,
            timeout,
        };
        let done = out.conn.position;
        let t0 = Instant::now();
        for txn in batch {
            if done.is_some_and(|p| p.commit_lsn > txn.meta.commit_lsn) {
                continue;
            }
            self.encoder.encode(txn, |r| {
                if done.is_some_and(|p| r.position <= p) {
                    return Ok(());
                }
                out.send(r)
            })?;
        }
        let (open, last) = (out.open, out.last);
        let produced = t0.elapsed();
        let position = last.filter(|_| eo && open);
        if let Some(last) = position {
            self.send_position(last)?;
        }
        // Every delivery report before committing: librdkafka's commit
        // would flush too, but through rust-rdkafka's event queue that
        // took ~100 ms per batch (measured, see docs/kafka-sink.md); with
        // the reports in, the commit is only EndTxn (~3 ms).
        let conn = self.conn.as_ref().expect("connected");
        if !conn.deliveries.wait_all(timeout) {
            self.check_deliveries()?;
            return Err(SinkError::transient(format!(
                "kafka: records not delivered within timeout_secs = {} (brokers down or slow)",
                self.cfg.timeout_secs
            )));
        }
        self.check_deliveries()?;
        let delivered = t0.elapsed();
        if let Some(last) = position {
            let conn = self.conn.as_mut().expect("connected");
            if let Err(e) = conn.producer.commit_transaction(timeout) {
                self.check_deliveries()?;
                return Err(self.fail("committing the transaction", &e));
            }
            conn.position = Some(last);
        }
        tracing::debug!(
            sink = %self.cfg.name,
            produce_ms = produced.as_secs_f64() * 1e3,
            deliver_ms = (delivered - produced).as_secs_f64() * 1e3,
            commit_ms = (t0.elapsed() - delivered).as_secs_f64() * 1e3,
            "kafka batch published"
        );
        Ok(())
    }

    /// Queues the position record of the open transaction.
    fn send_position(&mut self, last: Position) -> Result<(), SinkError> {
        let rec = PositionRecord {
            position: last.to_text(),
            system_identifier: self.owner.system_identifier.clone(),
            slot: self.owner.slot.clone(),
        };
        let value = serde_json::to_vec(&rec).expect("serialisable");
        let topic = self.cfg.position_topic();
        let record = BaseRecord::to(&topic)
            .key(self.cfg.name.as_bytes())
            .payload(&value);
        let conn = self.conn.as_ref().expect("connected");
        send_queued(&conn.producer, &conn.deliveries, record, self.timeout())
            .map_err(|e| self.fail("producing the position", &e))
    }

    /// The first delivery failure since the last check, classified.
    fn check_deliveries(&self) -> Result<(), SinkError> {
        let Some(conn) = &self.conn else {
            return Ok(());
        };
        let failed = conn
            .deliveries
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match failed {
            Some(e) => Err(self.fail("delivering a record", &e)),
            None => Ok(()),
        }
    }

    fn fail(&self, what: &str, e: &KafkaError) -> SinkError {
        classify(&self.cfg, what, e)
    }
}

/// One batch being produced.
struct Out<'a> {
    conn: &'a mut Conn,
    cfg: &'a KafkaConfig,
    rt: &'a tokio::runtime::Handle,
    topics: &'a mut HashSet<String>,
    /// A Kafka transaction is open.
    open: bool,
    /// The position of the last record queued.
    last: Option<Position>,
    max: usize,
    timeout: Duration,
}

impl Out<'_> {
    fn send(&mut self, r: &Record<'_>) -> Result<(), SinkError> {
        let size = r.key.map_or(0, <[u8]>::len)
            + r.value.map_or(0, <[u8]>::len)
            + r.headers
                .pairs()
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>()
            + 128;
        if size > self.max {
            return Err(SinkError::fatal(format!(
                "a change of {} at {} (commit {}) makes a Kafka record of about {size} bytes, over message.max.bytes = {}. \
                 Raise it: set [sink.kafka] \"message.max.bytes\" (and the brokers' message.max.bytes or the topic's max.message.bytes) above {size}, \
                 or leave the table out of source.tables; pgferry stops rather than drop the change",
                r.headers.table, r.headers.lsn, r.headers.commit_lsn, self.max
            )));
        }
        self.ensure_topic(r.dest)?;
        if self.cfg.exactly_once && !self.open {
            self.conn
                .producer
                .begin_transaction()
                .map_err(|e| classify(self.cfg, "beginning a transaction", &e))?;
            self.open = true;
        }
        let mut headers = OwnedHeaders::new_with_capacity(5);
        for (k, v) in r.headers.pairs() {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(r.dest).headers(headers);
        if let Some(k) = r.key {
            record = record.key(k);
        }
        if let Some(v) = r.value {
            record = record.payload(v);
        }
        send_queued(
            &self.conn.producer,
            &self.conn.deliveries,
            record,
            self.timeout,
        )
        .map_err(|e| classify(self.cfg, &format!("producing to {}", r.dest), &e))?;
        self.last = Some(r.position);
        Ok(())
    }

    /// Creates the topic the first time it is used (with `create_topics`).
    fn ensure_topic(&mut self, topic: &str) -> Result<(), SinkError> {
        let Some(admin) = &self.conn.admin else {
            return Ok(());
        };
        if self.topics.contains(topic) {
            return Ok(());
        }
        position::create_topic(
            admin,
            self.rt,
            topic,
            self.cfg.partitions,
            self.cfg.replication_factor,
            &[],
            self.timeout,
        )
        .map_err(|e| classify(self.cfg, &format!("creating topic {topic}"), &e))?;
        self.topics.insert(topic.to_string());
        Ok(())
    }
}

/// Queues a record, waiting (up to `timeout`) while the producer's queue is
/// full, and counts it in `deliveries` (before queueing: its report can
/// come at once).
fn send_queued<K: rdkafka::message::ToBytes + ?Sized, P: rdkafka::message::ToBytes + ?Sized>(
    producer: &ThreadedProducer<Deliveries>,
    deliveries: &Deliveries,
    mut record: BaseRecord<'_, K, P>,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let deadline = Instant::now() + timeout;
    loop {
        deliveries.queued();
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((e, r)) => {
                // Not queued: no report will come for it.
                deliveries.reported();
                match e {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
                        if Instant::now() < deadline =>
                    {
                        record = r;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    e => return Err(e),
                }
            }
        }
    }
}

/// Transient (the brokers are down, slow or electing) or fatal (fenced,
/// not authorised, a record too large, a fatal producer error), with what
/// to do.
pub fn classify(cfg: &KafkaConfig, what: &str, e: &KafkaError) -> SinkError {
    use RDKafkaErrorCode as C;
    let id = cfg.transactional_id();
    let code = e.rdkafka_error_code();
    let msg = match code {
        Some(C::Fenced | C::ProducerFenced | C::InvalidProducerEpoch | C::TransactionCoordinatorFenced) => format!(
            "{what}: {e}. The producer was fenced: another pgferry with sink name {:?} (transactional.id {id}) started and took over. \
             Two running pgferry processes must not share a Kafka sink name; this one stops so that nothing is published twice",
            cfg.name
        ),
        Some(C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed | C::TransactionalIdAuthorizationFailed
            | C::GroupAuthorizationFailed | C::SaslAuthenticationFailed | C::Authentication) => format!(
            "{what}: {e}. Not authorised: check the credentials in [sink.kafka] and grant the principal Write and Describe on the topics \
             (and Create with create_topics), Write and Describe on TransactionalId {id}, and IdempotentWrite on the cluster"
        ),
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => format!(
            "{what}: {e}. A record is larger than a broker or topic accepts: raise the brokers' message.max.bytes or the topic's max.message.bytes \
             (and [sink.kafka] \"message.max.bytes\")"
        ),
        _ => match e {
            KafkaError::Transaction(t) if t.is_fatal() => format!(
                "{what}: {e}. The transactional producer failed for good; start pgferry again (it resumes from the committed position)"
            ),
            _ => return SinkError::transient(format!("kafka: {what}: {e}")),
        },
    };
    SinkError::fatal(msg)
}

/// For `pgferry check`: connects without a `transactional.id` (so a
/// running pgferry is not fenced) and reads the cluster's metadata.
pub async fn probe(cfg: &KafkaConfig) -> Result<String, SinkError> {
    let cfg = Arc::new(cfg.clone());
    tokio::task::spawn_blocking(move || {
        let inner = Inner::new(
            &cfg,
            &StreamOwner {
                system_identifier: String::new(),
                database: String::new(),
                slot: String::new(),
            },
            tokio::runtime::Handle::current(),
        );
        let consumer: BaseConsumer = position::consumer_config(&inner.base_config())
            .create()
            .map_err(|e| inner.fail("creating a client", &e))?;
        let md = rdkafka::consumer::Consumer::fetch_metadata(&consumer, None, inner.timeout())
            .map_err(|e| inner.fail("reading the cluster's metadata", &e))?;
        let topic = cfg.position_topic();
        let position = if md.topics().iter().any(|t| t.name() == topic) {
            format!("{topic} exists")
        } else {
            format!("{topic} does not exist yet (created on first use)")
        };
        Ok(format!(
            "{} broker(s) reachable, {} topic(s); {position}",
            md.brokers().len(),
            md.topics().len()
        ))
    })
    .await
    .map_err(|e| SinkError::transient(format!("kafka probe failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> KafkaConfig {
        let text = "name = \"events\"\nbrokers = \"b:9092\"\n";
        toml::from_str(text).unwrap()
    }

    #[test]
    fn errors_are_classified_with_the_fix() {
        let c = cfg();
        let e = |code| KafkaError::MessageProduction(code);
        let fatal = |err: SinkError| match err {
            SinkError::Fatal { message: m, .. } => m,
            other => panic!("not fatal: {other}"),
        };
        let m = fatal(classify(
            &c,
            "committing",
            &e(RDKafkaErrorCode::ProducerFenced),
        ));
        assert!(m.contains("fenced") && m.contains("pgferry.events"), "{m}");
        let m = fatal(classify(
            &c,
            "producing",
            &e(RDKafkaErrorCode::TopicAuthorizationFailed),
        ));
        assert!(m.contains("TransactionalId pgferry.events"), "{m}");
        let m = fatal(classify(
            &c,
            "producing",
            &e(RDKafkaErrorCode::MessageSizeTooLarge),
        ));
        assert!(m.contains("max.message.bytes"), "{m}");
        for code in [
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
        ] {
            assert!(
                matches!(classify(&c, "x", &e(code)), SinkError::Transient { .. }),
                "{code:?}"
            );
        }
    }
}
