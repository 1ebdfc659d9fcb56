//! The NATS JetStream sink: a thin transport over the event-log encoder.
//!
//! Invariants:
//! - Every message carries `Nats-Msg-Id: <slot>:<commit_lsn>:<index>` (the
//!   record's [`Position`]), so JetStream stores a message published again
//!   within the stream's duplicate window once.
//! - A batch counts as applied only when the server acknowledged every one
//!   of its messages; publishing is pipelined, at most `max_in_flight`
//!   unacknowledged.
//! - Before the first batch, the sink reads the last message on its
//!   subjects back from the stream: its headers carry its position, and
//!   every record at or before it is skipped. So a pgferry crash repeats
//!   nothing, whatever the outage's length.
//! - The stream only ever holds a gap-free prefix of the sink's messages:
//!   each message but the first after a read-back carries
//!   `Nats-Expected-Last-Msg-Id` = its predecessor's id, so the server
//!   refuses a message whose predecessor it does not hold. (A reconnecting
//!   client re-sends what it still had queued, while what sat in the dead
//!   connection's buffers is lost: without the chain the stream got later
//!   messages of a batch without earlier ones, and filling the gap broke
//!   per-key order.) After an error the sink therefore resumes after the
//!   stream's last message, as at start; copies of messages it already
//!   holds are dropped by JetStream's deduplication within the duplicate
//!   window.
//! - A message over the server's `max_payload` or the stream's
//!   `max_msg_size` is never sent: it stops the sink with the fix.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream::context::{GetStreamErrorKind, PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config as StreamConfig, LastRawMessageErrorKind, Stream};
use async_nats::jetstream::{self, ErrorCode};
use bytes::Bytes;
use tokio::sync::mpsc;

use super::config::NatsConfig;
use super::subjects;
use crate::event::{Changes, Transaction};
use crate::sink::eventlog::route::nats_subject_char;
use crate::sink::eventlog::{Encoder, EncoderOptions, Position, Record};
use crate::sink::{Sink, SinkError, StreamOwner, TableFilter};

/// Header naming the stream a message belongs to: `<system id>/<database>`.
pub const SOURCE_HEADER: &str = "Pgferry-Source";
/// Header holding the record's key (the replica identity as JSON).
pub const KEY_HEADER: &str = "key";

/// A connection with JetStream, and what the stream allows.
struct Conn {
    js: jetstream::Context,
    stream: Stream,
    /// The largest message (headers and payload) the server and the stream take.
    limit: usize,
}

/// One message ready to publish.
struct Outgoing {
    subject: String,
    msg: PublishMessage,
    position: Position,
}

pub struct NatsSink {
    cfg: Arc<NatsConfig>,
    owner: StreamOwner,
    /// `<system id>/<database>`, the [`SOURCE_HEADER`] of our messages.
    source: String,
    filters: Vec<String>,
    encoder: Option<Encoder>,
    /// The client, kept across errors: it reconnects by itself.
    client: Option<async_nats::Client>,
    /// The JetStream context and the checked stream; checked again after an error.
    conn: Option<Conn>,
    /// Where publishing resumes (what is at or before it is skipped);
    /// `None`: read the stream back first.
    position: Option<Position>,
    /// A permission violation the server reported (asynchronously).
    denied: Arc<Mutex<Option<String>>>,
}

impl NatsSink {
    pub fn open(cfg: &NatsConfig, owner: StreamOwner) -> Result<NatsSink, SinkError> {
        cfg.validate().map_err(|(k, m)| {
            SinkError::fatal(format!("sink {:?}: config key {k}: {m}", cfg.name))
        })?;
        let overrides = cfg.overrides();
        let filters = subjects::filters(&cfg.subject, &overrides);
        let encoder = Encoder::new(
            EncoderOptions {
                format: cfg.format,
                dest: cfg.subject.clone(),
                overrides,
                tables: TableFilter::new(cfg.table_names()),
                tombstones: false,
                sink: cfg.name.clone(),
                valid_char: nats_subject_char,
            },
            owner.clone(),
        );
        let cfg = Arc::new(NatsConfig {
            name: cfg.name.clone(),
            url: cfg.url.clone(),
            subject: cfg.subject.clone(),
            stream: cfg.stream.clone(),
            create_stream: cfg.create_stream,
            format: cfg.format,
            tables: Default::default(),
            duplicate_window_secs: cfg.duplicate_window_secs,
            max_in_flight: cfg.max_in_flight,
            timeout_secs: cfg.timeout_secs,
            user: cfg.user.clone(),
            password: cfg.password.clone(),
            token: cfg.token.clone(),
            credentials_file: cfg.credentials_file.clone(),
            nkey_seed_file: cfg.nkey_seed_file.clone(),
            tls_ca_file: cfg.tls_ca_file.clone(),
            max_failure_secs: cfg.max_failure_secs,
        });
        Ok(NatsSink {
            source: format!("{}/{}", owner.system_identifier, owner.database),
            cfg,
            owner,
            filters,
            encoder: Some(encoder),
            client: None,
            conn: None,
            position: None,
            denied: Arc::new(Mutex::new(None)),
        })
    }

    fn fatal(&self, m: impl std::fmt::Display) -> SinkError {
        // The pipeline names the sink.
        SinkError::fatal(m.to_string())
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.cfg.timeout_secs)
    }

    /// Connects (once; the client reconnects by itself) and makes sure the
    /// stream exists and covers the subjects.
    async fn connection(&mut self) -> Result<&Conn, SinkError> {
        if self.conn.is_none() {
            let client = match &self.client {
                Some(c) => c.clone(),
                None => {
                    let c = self.connect().await?;
                    self.client = Some(c.clone());
                    c
                }
            };
            let max_payload = client.server_info().max_payload;
            let js = jetstream::ContextBuilder::new()
                .timeout(self.timeout())
                .max_ack_inflight(self.cfg.max_in_flight * 2)
                .backpressure_on_inflight(true)
                .build(client);
            let stream = self.ensure_stream(&js).await?;
            let stream_max = stream.cached_info().config.max_message_size;
            let limit = match usize::try_from(stream_max) {
                Ok(m) if m > 0 => m.min(max_payload),
                _ => max_payload,
            };
            self.conn = Some(Conn { js, stream, limit });
        }
        Ok(self.conn.as_ref().expect("connected above"))
    }

    async fn connect(&self) -> Result<async_nats::Client, SinkError> {
        let cfg = &self.cfg;
        // One crypto provider for rustls (TLS); ignore "already installed".
        let _ = rustls::crypto::ring::default_provider().install_default();
        let denied = self.denied.clone();
        let name = cfg.name.clone();
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("pgferry {}", cfg.name))
            .connection_timeout(self.timeout())
            .request_timeout(Some(self.timeout()))
            .event_callback(move |ev| {
                let denied = denied.clone();
                let name = name.clone();
                async move { note_event(&name, ev, &denied) }
            });
        if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &cfg.token {
            opts = opts.token(t.clone());
        }
        if let Some(path) = &cfg.credentials_file {
            opts = opts.credentials_file(path).await.map_err(|e| {
                self.fatal(format!(
                    "cannot read credentials_file {}: {e}; point it at the .creds file nsc wrote",
                    path.display()
                ))
            })?;
        }
        if let Some(path) = &cfg.nkey_seed_file {
            let seed = std::fs::read_to_string(path).map_err(|e| {
                self.fatal(format!(
                    "cannot read nkey_seed_file {}: {e}; point it at a file holding the user's NKey seed (SU…)",
                    path.display()
                ))
            })?;
            opts = opts.nkey(seed.trim().to_string());
        }
        if cfg.url.split(',').any(|u| u.trim().starts_with("tls://")) {
            opts = opts.require_tls(true);
        }
        if let Some(ca) = &cfg.tls_ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        let addrs: Vec<async_nats::ServerAddr> = cfg
            .url
            .split(',')
            .map(|u| u.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|e| self.fatal(format!("invalid url {}: {e}", cfg.redacted_url())))?;
        let url = cfg.redacted_url();
        match tokio::time::timeout(self.timeout() * 2, opts.connect(addrs)).await {
            Err(_) => Err(SinkError::transient(format!(
                "connecting to NATS at {url} timed out after {} s",
                cfg.timeout_secs * 2
            ))),
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(classify_connect(&url, e)),
        }
    }

    /// Gets the stream, or creates it; checks that it covers our subjects.
    async fn ensure_stream(&self, js: &jetstream::Context) -> Result<Stream, SinkError> {
        let name = &self.cfg.stream;
        let mut stream = match js.get_stream(name).await {
            Ok(s) => s,
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    return self.create_stream(js).await;
                }
                _ => {
                    return Err(SinkError::transient(format!(
                        "reading stream {name:?} from NATS: {e} (is JetStream enabled on the server: nats-server -js?)"
                    )))
                }
            },
        };
        let info = stream
            .info()
            .await
            .map_err(|e| SinkError::transient(format!("reading stream {name:?}'s config: {e}")))?;
        let have = &info.config.subjects;
        if let Some(missing) = self
            .filters
            .iter()
            .find(|f| !have.iter().any(|h| subjects::covers(h, f)))
        {
            return Err(self.fatal(format!(
                "stream {name:?} exists but does not store subject {missing:?} (its subjects are {have:?}); \
                 add {missing:?} to the stream's subjects (nats stream edit {name}), or set `stream` to a stream of pgferry's own"
            )));
        }
        let window = info.config.duplicate_window;
        if window < Duration::from_secs(self.cfg.duplicate_window_secs) {
            tracing::warn!(sink = %self.cfg.name, stream = %name, window_secs = window.as_secs(),
                "the stream's duplicate window is shorter than duplicate_window_secs; it is the longest outage re-publishing covers without duplicates");
        }
        Ok(stream)
    }

    async fn create_stream(&self, js: &jetstream::Context) -> Result<Stream, SinkError> {
        let name = &self.cfg.stream;
        if !self.cfg.create_stream {
            return Err(self.fatal(format!(
                "stream {name:?} does not exist and create_stream = false; create it with subjects {:?} \
                 (nats stream add {name} --subjects ...), or set create_stream = true",
                self.filters
            )));
        }
        let config = StreamConfig {
            name: name.clone(),
            subjects: self.filters.clone(),
            duplicate_window: Duration::from_secs(self.cfg.duplicate_window_secs),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        match js.create_stream(config).await {
            Ok(s) => {
                tracing::info!(sink = %self.cfg.name, stream = %name, subjects = ?self.filters,
                    "created the JetStream stream");
                Ok(s)
            }
            Err(e) => match e.kind() {
                async_nats::jetstream::context::CreateStreamErrorKind::JetStream(j) => {
                    Err(self.fatal(format!(
                        "creating stream {name:?} with subjects {:?} failed: {j}; when another stream already \
                         stores these subjects, set `stream` to that stream's name or give the sink other subjects",
                        self.filters
                    )))
                }
                _ => Err(SinkError::transient(format!(
                    "creating stream {name:?}: {e} (is JetStream enabled on the server: nats-server -js?)"
                ))),
            },
        }
    }

    /// For `pgferry check`: connects (address, TLS, credentials), checks the
    /// stream and reads the position back. Publishes and creates nothing.
    pub async fn probe(&mut self) -> Result<String, SinkError> {
        let client = self.connect().await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(self.timeout())
            .build(client.clone());
        let url = self.cfg.redacted_url();
        let name = self.cfg.stream.clone();
        if let Err(e) = js.get_stream(&name).await {
            return match e.kind() {
                GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                    if self.cfg.create_stream {
                        Ok(format!(
                            "NATS at {url}; stream {name:?} does not exist yet (created on first use, subjects {:?})",
                            self.filters
                        ))
                    } else {
                        Err(self.fatal(format!(
                            "stream {name:?} does not exist and create_stream = false; create it with subjects {:?}",
                            self.filters
                        )))
                    }
                }
                _ => Err(SinkError::transient(format!(
                    "reading stream {name:?}: {e} (is JetStream enabled on the server: nats-server -js?)"
                ))),
            };
        }
        self.client = Some(client);
        let position = self.recover().await?;
        let conn = self.conn.as_ref().expect("connected by recover");
        Ok(format!(
            "NATS at {url}, stream {name:?} covers {:?}, messages up to {} bytes, position {}",
            self.filters,
            conn.limit,
            position.to_text()
        ))
    }

    /// The position of the last message on our subjects (`Position::default()`
    /// when there is none).
    async fn recover(&mut self) -> Result<Position, SinkError> {
        self.connection().await?;
        let conn = self.conn.as_ref().expect("connected above");
        let mut found: Vec<(String, u64, HeaderMap)> = Vec::new();
        for f in &self.filters {
            match conn.stream.get_last_raw_message_by_subject(f).await {
                Ok(m) => found.push((m.subject.to_string(), m.sequence, m.headers)),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) => {
                    return Err(SinkError::transient(format!(
                        "reading the last message on {f:?} from stream {:?}: {e}",
                        self.cfg.stream
                    )))
                }
            }
        }
        let mut last = Position::default();
        for (subject, seq, headers) in found {
            let p = self.own_position(&subject, seq, &headers)?;
            last = last.max(p);
        }
        tracing::info!(sink = %self.cfg.name, stream = %self.cfg.stream, position = %last.to_text(),
            "position read back from the stream");
        Ok(last)
    }

    /// The position of one of our messages; an error when another publisher
    /// (or another pgferry) wrote it.
    fn own_position(&self, subject: &str, seq: u64, h: &HeaderMap) -> Result<Position, SinkError> {
        let id = h.get("Nats-Msg-Id").map(|v| v.as_str().to_string());
        let source = h.get(SOURCE_HEADER).map(|v| v.as_str().to_string());
        let parsed = id.as_deref().and_then(|id| {
            let (slot, pos) = id.split_once(':')?;
            Some((slot.to_string(), Position::parse(pos)?))
        });
        match parsed {
            Some((slot, p)) if slot == self.owner.slot && source.as_deref() == Some(&self.source) => Ok(p),
            _ => Err(self.fatal(format!(
                "the last message on {subject:?} in stream {:?} (sequence {seq}, Nats-Msg-Id {id:?}, {SOURCE_HEADER} {source:?}) \
                 was not published by this pgferry (slot {:?}, source {:?}), so its position cannot be read back. \
                 pgferry must be the only publisher to its subjects: give this sink a subject template of its own \
                 (e.g. subject = \"{}.{{schema}}.{{table}}\")",
                self.cfg.stream, self.owner.slot, self.source, self.owner.slot
            ))),
        }
    }

    async fn apply_inner(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError> {
        let enc = self
            .encoder
            .as_ref()
            .expect("encoder present between batches");
        if !relevant(batch, enc) {
            return Ok(());
        }
        // Continuing after a batch the server acknowledged whole: its last
        // message is the stream's last, and the chain goes on from it. After
        // a read-back the first message starts a new chain.
        let (start, chained) = match self.position {
            Some(p) => (p, true),
            None => {
                let p = self.recover().await?;
                self.position = Some(p);
                (p, false)
            }
        };
        let limit = self.connection().await?.limit;
        let (tx, rx) = mpsc::channel::<Outgoing>(256);
        let mut enc = self
            .encoder
            .take()
            .expect("encoder present between batches");
        let txns = batch.to_vec();
        let ctx = Prep {
            slot: self.owner.slot.clone(),
            source: self.source.clone(),
            limit,
            start,
            chained,
        };
        let producer = tokio::task::spawn_blocking(move || {
            let r = produce(&mut enc, &txns, &ctx, &tx);
            (enc, r)
        });
        let published = self.publish_all(rx).await;
        let (enc, produced) = producer
            .await
            .map_err(|e| self.fatal(format!("the NATS message builder failed: {e}")))?;
        self.encoder = Some(enc);
        let last = published?;
        produced?;
        if let Some(p) = last {
            self.position = Some(p);
        }
        Ok(())
    }

    /// Publishes what the producer sends, pipelined; returns the position of
    /// the last message once every message is acknowledged.
    async fn publish_all(
        &mut self,
        mut rx: mpsc::Receiver<Outgoing>,
    ) -> Result<Option<Position>, SinkError> {
        let max = self.cfg.max_in_flight;
        let conn = self.conn.as_ref().expect("connected before publishing");
        let js = conn.js.clone();
        let mut inflight: VecDeque<(PublishAckFuture, Position)> = VecDeque::with_capacity(max);
        let mut last = None;
        let mut duplicates = 0u64;
        while let Some(m) = rx.recv().await {
            if inflight.len() >= max {
                let (fut, pos) = inflight.pop_front().expect("non-empty");
                duplicates += u64::from(self.acked(fut, pos).await?);
            }
            let fut = js
                .send_publish(m.subject, m.msg)
                .await
                .map_err(|e| self.publish_error(e, m.position))?;
            inflight.push_back((fut, m.position));
            last = Some(m.position);
        }
        while let Some((fut, pos)) = inflight.pop_front() {
            duplicates += u64::from(self.acked(fut, pos).await?);
        }
        if duplicates > 0 {
            tracing::info!(sink = %self.cfg.name, duplicates,
                "the stream already held messages published again after a failure; JetStream stored them once");
        }
        Ok(last)
    }

    /// Waits for one acknowledgement: `true` when the server says it is a duplicate.
    async fn acked(&mut self, fut: PublishAckFuture, pos: Position) -> Result<bool, SinkError> {
        match fut.await {
            Ok(ack) => Ok(ack.duplicate),
            Err(e) => Err(self.publish_error(e, pos)),
        }
    }

    fn publish_error(
        &self,
        e: async_nats::jetstream::context::PublishError,
        pos: Position,
    ) -> SinkError {
        if let Some(why) = self.denied.lock().expect("not poisoned").clone() {
            return self.fatal(format!(
                "the NATS server refused to let pgferry publish: {why}; allow the sink's user to publish to {:?} \
                 (and to use the JetStream API, $JS.API.>)",
                self.filters
            ));
        }
        let at = pos.to_text();
        match e.kind() {
            PublishErrorKind::MaxPayloadExceeded => self.fatal(format!(
                "the message at {at} is larger than the server's max_payload ({e}); raise max_payload in nats-server's config, \
                 or leave the table out of the sink's tables"
            )),
            _ => SinkError::transient(format!(
                "publishing to stream {:?} (message {at}): {e}",
                self.cfg.stream
            )),
        }
    }
}

/// What the producer needs besides the encoder.
struct Prep {
    slot: String,
    source: String,
    limit: usize,
    start: Position,
    /// `start` is the last message of a batch published whole by this
    /// connection: the first message may expect it.
    chained: bool,
}

/// Encodes `txns` into messages (skipping what is at or before
/// `ctx.start`), on a blocking thread: spilled transactions are read from disk.
fn produce(
    enc: &mut Encoder,
    txns: &[Arc<Transaction>],
    ctx: &Prep,
    tx: &mpsc::Sender<Outgoing>,
) -> Result<(), SinkError> {
    let mut prev = ctx.chained.then(|| msg_id(ctx, ctx.start));
    for t in txns {
        if t.meta.commit_lsn < ctx.start.commit_lsn {
            continue;
        }
        enc.encode(t, |r| {
            if r.position <= ctx.start {
                return Ok(());
            }
            let out = message(r, ctx, prev.as_deref())?;
            prev = Some(msg_id(ctx, r.position));
            // The receiver is gone only when publishing failed; that error wins.
            tx.blocking_send(out)
                .map_err(|_| SinkError::transient("publishing stopped"))
        })?;
    }
    Ok(())
}

/// The `Nats-Msg-Id` of the message at `p`.
fn msg_id(ctx: &Prep, p: Position) -> String {
    format!("{}:{}", ctx.slot, p.to_text())
}

/// One record as a NATS message, checked against the size limit; `prev`:
/// the id the stream's last message must have for the server to store it.
fn message(r: &Record<'_>, ctx: &Prep, prev: Option<&str>) -> Result<Outgoing, SinkError> {
    let id = msg_id(ctx, r.position);
    let key = r.key.map(String::from_utf8_lossy);
    let pairs = r.headers.pairs();
    let mut all: Vec<(&str, &str)> = vec![("Nats-Msg-Id", &id), (SOURCE_HEADER, &ctx.source)];
    if let Some(p) = prev {
        all.push(("Nats-Expected-Last-Msg-Id", p));
    }
    all.extend(pairs.iter().copied());
    if let Some(k) = &key {
        all.push((KEY_HEADER, k.as_ref()));
    }
    // On the wire: "NATS/1.0\r\n", each "name: value\r\n", then "\r\n".
    let header_bytes = 12
        + all
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>();
    let mut headers = HeaderMap::new();
    for (k, v) in all {
        headers.insert(k, v);
    }
    let payload = Bytes::copy_from_slice(r.value.unwrap_or_default());
    let size = header_bytes + payload.len();
    if size > ctx.limit {
        return Err(SinkError::fatal(format!(
            "the change to {} at {} is {size} bytes as a NATS message ({} payload, {header_bytes} headers), \
             over the limit of {} bytes (the server's max_payload, or the stream's max_msg_size when smaller). \
             Raise max_payload in nats-server's config (at most 64 MB) and the stream's max_msg_size, \
             or leave the table out of the sink's tables",
            r.headers.table,
            r.headers.lsn,
            payload.len(),
            ctx.limit
        )));
    }
    let msg = PublishMessage::build().payload(payload).headers(headers);
    Ok(Outgoing {
        subject: r.dest.to_string(),
        msg,
        position: r.position,
    })
}

/// Whether a batch may hold a record for this sink (a spilled transaction
/// always may).
fn relevant(batch: &[Arc<Transaction>], enc: &Encoder) -> bool {
    batch.iter().any(|t| match &t.changes {
        Changes::Memory(v) => v
            .iter()
            .any(|c| enc.options().tables.accepts(&c.rel.qualified)),
        Changes::Spilled { .. } => true,
    })
}

/// Keeps a permission violation the server reports, for the publish error
/// it causes (an acknowledgement that never comes).
fn note_event(sink: &str, ev: async_nats::Event, denied: &Mutex<Option<String>>) {
    match ev {
        async_nats::Event::ServerError(async_nats::ServerError::Other(m))
            if m.to_ascii_lowercase().contains("permissions violation") =>
        {
            tracing::error!(sink = %sink, "NATS: {m}");
            *denied.lock().expect("not poisoned") = Some(m);
        }
        async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {
            *denied.lock().expect("not poisoned") = Some("authorization violation".into());
        }
        other => tracing::debug!(sink = %sink, "NATS: {other}"),
    }
}

fn classify_connect(url: &str, e: async_nats::ConnectError) -> SinkError {
    use async_nats::ConnectErrorKind as K;
    match e.kind() {
        K::Authentication | K::AuthorizationViolation => SinkError::fatal(format!(
            "NATS at {url} refused the credentials ({e}); check user/password, token, credentials_file or nkey_seed_file"
        )),
        K::ServerParse => SinkError::fatal(format!("invalid url {url}: {e}")),
        K::Tls => SinkError::fatal(format!(
            "TLS with NATS at {url} failed ({e}); check that the server has TLS enabled and that \
             tls_ca_file holds the CA that signed its certificate"
        )),
        _ => SinkError::transient(format!("connecting to NATS at {url}: {e}")),
    }
}

#[async_trait::async_trait]
impl Sink for NatsSink {
    async fn apply(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError> {
        let r = self.apply_inner(batch).await;
        if r.is_err() {
            // Check the stream and read the position back before publishing
            // again (the stream may have been deleted, or the server may have
            // stored more than it acknowledged).
            self.position = None;
            self.conn = None;
        }
        r
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        self.conn = None;
        if let Some(c) = self.client.take() {
            let _ = tokio::time::timeout(self.timeout(), c.flush()).await;
        }
        Ok(())
    }
}
