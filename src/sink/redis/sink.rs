use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::sync::mpsc;

use super::commands::{Builder, Kind, Position, Rules, TableRule, Unit};
use super::config::RedisConfig;
use super::position::{self, Stored};
use crate::event::{Changes, Transaction};
use crate::sink::{Sink, SinkError, StreamOwner};

/// Keeps Redis keys in step with the replicated tables.
pub struct RedisSink {
    name: String,
    url: String,
    client: redis::Client,
    conn: Option<ConnectionManager>,
    timeout: Duration,
    rules: Arc<Rules>,
    /// What Redis holds, as last read or written; `None`: read it before
    /// applying anything (at start and after any failure).
    position: Option<Position>,
    /// Redis held a position at some point in this process.
    had_position: bool,
    /// The last transaction seen in a batch that needed nothing from Redis.
    passed: Option<Position>,
    /// The default prefix of older versions (`pgferry:<name>`), checked when
    /// the position is missing (see [`RedisConfig::legacy_state_prefix`]).
    legacy_prefix: Option<String>,
}

impl RedisSink {
    /// Checks the config and prepares the client. Does not connect: a Redis
    /// that is down at start is retried like any outage.
    pub async fn open(cfg: &RedisConfig, owner: StreamOwner) -> Result<RedisSink, SinkError> {
        let fatal = |m: String| SinkError::fatal(format!("sink {:?}: {m}", cfg.name));
        cfg.validate()
            .map_err(|(k, m)| fatal(format!("config key {k}: {m}")))?;
        let info = redis::IntoConnectionInfo::into_connection_info(cfg.url.as_str())
            .map_err(|e| fatal(format!("invalid url {}: {e}", cfg.redacted_url())))?;
        // One crypto provider for rustls (TLS); ignore "already installed".
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = match &cfg.tls_ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    fatal(format!(
                        "cannot read tls_ca_file {}: {e}; point it at a PEM file of CA certificates",
                        path.display()
                    ))
                })?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
            None => redis::Client::open(info),
        }
        .map_err(|e| fatal(format!("cannot use {}: {e}", cfg.redacted_url())))?;
        Ok(RedisSink {
            name: cfg.name.clone(),
            url: cfg.redacted_url(),
            client,
            conn: None,
            timeout: Duration::from_secs(cfg.timeout_secs),
            rules: Arc::new(Rules::new(cfg, owner)?),
            position: None,
            had_position: false,
            passed: None,
            legacy_prefix: cfg.legacy_state_prefix.clone(),
        })
    }

    async fn connection(&mut self) -> Result<ConnectionManager, SinkError> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        // The manager reconnects by itself after a broken connection; the
        // pipeline's retry loop does the waiting, so its own retries are few.
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let c = tokio::time::timeout(
            self.timeout * 2,
            ConnectionManager::new_with_config(self.client.clone(), cfg),
        )
        .await
        .map_err(|_| {
            SinkError::transient(format!(
                "connecting to Redis at {} timed out after {} s",
                self.url,
                self.timeout.as_secs() * 2
            ))
        })?
        .map_err(|e| self.classify(e, "connecting"))?;
        self.conn = Some(c.clone());
        Ok(c)
    }

    /// For `pgferry check`: connects (so the address, TLS and credentials
    /// are verified), reads the server's version and the position (which
    /// must be this stream's, see [`Self::read_position`]). Writes nothing.
    pub async fn probe(&mut self) -> Result<String, SinkError> {
        let mut conn = self.connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.classify(e, "reading INFO"))?;
        let version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        let old = version
            .split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0))
            .take(2)
            .collect::<Vec<_>>()
            < vec![6, 2];
        if old && version != "?" {
            return Err(SinkError::fatal(format!(
                "Redis at {} is version {version}; pgferry needs 6.2 or later",
                self.url
            )));
        }
        let pos = self.read_position(&mut conn).await?;
        Ok(format!(
            "Redis {version} at {}, position {} {}",
            self.url, pos.commit, pos.changes
        ))
    }

    /// Reads the position Redis holds (what it has already applied), and
    /// checks that it is this stream's.
    async fn read_position(&mut self, conn: &mut ConnectionManager) -> Result<Position, SinkError> {
        let key = self.rules.position_key.clone();
        let v: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(conn)
            .await
            .map_err(|e| self.classify(e, "reading the position"))?;
        let pos = match v {
            None => {
                self.check_legacy_position(conn).await?;
                if self.had_position {
                    tracing::warn!(sink = %self.name, key = %key,
                        "Redis no longer holds pgferry's position: it lost its data (restarted without persistence, flushed, or failed over to a replica that was behind). \
                         The cache now only gets changes from here on; rows that do not change again stay missing until they do");
                }
                Position::default()
            }
            Some(text) => {
                self.had_position = true;
                let stored = position::decode(&text).ok_or_else(|| {
                    SinkError::fatal(format!(
                        "Redis key {key:?} holds {text:?}, which is not a pgferry position; another program uses that key. \
                         Set state_prefix in the sink's config to a prefix of pgferry's own"
                    ))
                })?;
                if let Some(why) = position::foreign_owner(&key, &stored, &self.rules.owner) {
                    return Err(SinkError::fatal(format!("sink {:?}: {why}", self.name)));
                }
                match stored {
                    Stored::Owned(p, _) => p,
                    Stored::Unowned(_) => {
                        return Err(SinkError::fatal(format!(
                            "sink {:?}: Redis key {key:?} holds a position written by an older pgferry, {}",
                            self.name,
                            position::OLDER_VERSION
                        )))
                    }
                }
            }
        };
        tracing::debug!(sink = %self.name, commit = %pos.commit, changes = pos.changes, "position in Redis");
        Ok(pos)
    }

    /// With the default `state_prefix`, a position under the default of
    /// older versions (`pgferry:<name>`) means this sink's history is there:
    /// starting afresh would replay what Redis holds, so stop and say how to
    /// keep it.
    async fn check_legacy_position(&self, conn: &mut ConnectionManager) -> Result<(), SinkError> {
        let Some(legacy) = &self.legacy_prefix else {
            return Ok(());
        };
        let key = position::position_key(legacy);
        let old: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(conn)
            .await
            .map_err(|e| self.classify(e, "reading the position"))?;
        match old {
            Some(text) if position::decode(&text).is_some() => Err(SinkError::fatal(format!(
                "sink {:?}: Redis holds this sink's position under {key:?}, the default state_prefix of older pgferry versions \
                 (the default is now pgferry:<slot>:<sink name>), {}",
                self.name,
                position::OLDER_VERSION
            ))),
            _ => Ok(()),
        }
    }

    async fn apply_inner(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError> {
        // A batch without a change for our tables does not need Redis.
        let relevant = batch.iter().any(|t| match &t.changes {
            Changes::Memory(v) => v
                .iter()
                .any(|c| self.rules.tables.contains_key(&c.rel.qualified)),
            Changes::Spilled { .. } => true,
        });
        if !relevant {
            if let Some(last) = batch.last() {
                if let Changes::Memory(v) = &last.changes {
                    self.passed = Some(Position {
                        commit: last.meta.commit_lsn,
                        changes: v.len() as u64,
                    });
                }
            }
            return Ok(());
        }
        let mut conn = self.connection().await?;
        let start = match self.position {
            Some(p) => p,
            None => {
                let p = self.read_position(&mut conn).await?;
                self.position = Some(p);
                p
            }
        };
        // Commands are rendered on a blocking thread (spilled transactions
        // are read from disk) and handed over one unit at a time.
        let (tx, mut rx) = mpsc::channel::<Unit>(1);
        let txns = batch.to_vec();
        let rules = self.rules.clone();
        let producer = tokio::task::spawn_blocking(move || produce(txns, rules, start, tx));
        let mut failed = None;
        while let Some(unit) = rx.recv().await {
            if let Err(e) = self.exec(&mut conn, unit).await {
                failed = Some(e);
                break;
            }
        }
        drop(rx);
        let produced = producer
            .await
            .map_err(|e| SinkError::fatal(format!("the Redis command builder failed: {e}")))?;
        if let Some(e) = failed {
            return Err(e);
        }
        produced
    }

    /// Runs one unit: invalidate-mode truncates, then `MULTI … EXEC`.
    async fn exec(&mut self, conn: &mut ConnectionManager, unit: Unit) -> Result<(), SinkError> {
        for rule in &unit.scans {
            self.delete_matching(conn, rule).await?;
        }
        let reply: Value = unit
            .pipe
            .query_async(conn)
            .await
            .map_err(|e| self.classify(e, "applying a transaction"))?;
        let Value::Array(replies) = reply else {
            return Err(SinkError::transient(format!(
                "unexpected reply from Redis: {reply:?}"
            )));
        };
        let n = unit.kinds.len();
        if replies.len() != n + 2 {
            return Err(SinkError::transient(format!(
                "Redis answered {} replies to {} commands",
                replies.len(),
                n + 2
            )));
        }
        match &replies[n + 1] {
            Value::Array(results) => {
                let mut dropped = 0u64;
                let mut failure = None;
                for (i, (r, kind)) in results.iter().zip(&unit.kinds).enumerate() {
                    match r {
                        Value::ServerError(e) if failure.is_none() => {
                            failure = Some(format!("{} failed: {e}", describe(&unit.pipe, i + 1)))
                        }
                        Value::Int(0) if *kind == Kind::Merge => dropped += 1,
                        _ => {}
                    }
                }
                if let Some(f) = failure {
                    return Err(self.partially_applied(conn, f).await);
                }
                if dropped > 0 {
                    tracing::warn!(sink = %self.name, rows = dropped,
                        "updates that did not carry their unchanged TOASTed values found no stored row to complete (expired, evicted or never cached): \
                         those keys were deleted rather than stored incomplete");
                }
            }
            Value::ServerError(e) => {
                // EXECABORT: a command was refused when queued, nothing ran.
                let cause = replies[1..=n]
                    .iter()
                    .enumerate()
                    .find_map(|(i, r)| match r {
                        Value::ServerError(q) => Some((i + 1, q.clone())),
                        _ => None,
                    });
                return Err(match cause {
                    Some((_, q)) if matches!(q.code(), "OOM" | "LOADING" | "BUSY" | "MISCONF" | "READONLY" | "TRYAGAIN" | "MASTERDOWN") => {
                        SinkError::transient(format!("Redis refused the transaction (nothing was applied): {q}"))
                    }
                    Some((i, q)) => SinkError::fatal(format!(
                        "Redis refused {} ({q}), so nothing of the transaction was applied. Retrying cannot help; \
                         check that the server is Redis 6.2 or later (or a compatible server) with Lua scripting and that the ACL user may run it",
                        describe(&unit.pipe, i)
                    )),
                    None => SinkError::transient(format!("Redis aborted the transaction: {e}")),
                });
            }
            other => {
                return Err(SinkError::transient(format!(
                    "Redis did not run the transaction: {other:?}"
                )))
            }
        }
        tracing::debug!(sink = %self.name, changes = unit.changes, commands = n, commit = %unit.position.commit, "applied to Redis");
        self.position = Some(unit.position);
        self.had_position = true;
        Ok(())
    }

    /// A command failed inside `EXEC`: Redis ran the others, and no rollback
    /// exists. Put the position back so that a restart applies the unit
    /// again once the cause is fixed, and stop.
    async fn partially_applied(
        &mut self,
        conn: &mut ConnectionManager,
        failure: String,
    ) -> SinkError {
        let key = self.rules.position_key.clone();
        let reset = match self.position.filter(|p| *p != Position::default()) {
            Some(p) => {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(position::encode(p, &self.rules.owner))
                    .query_async::<()>(conn)
                    .await
            }
            None => redis::cmd("DEL").arg(&key).query_async::<()>(conn).await,
        };
        let tail = match reset {
            Ok(()) => "Its other commands were applied; the transaction is applied again when pgferry restarts.".to_string(),
            Err(e) => format!(
                "Its other commands were applied, and pgferry could not reset its position key {key:?} ({e}): \
                 delete the tables' keys (or FLUSHDB) before restarting, so the cache is rebuilt by new changes only"
            ),
        };
        SinkError::fatal(format!(
            "Redis: {failure}. Retrying cannot fix this: a key pgferry writes holds a value of another type (another program writes it, \
             or the table's mode changed), or the server refused a script. pgferry owns the keys of its key templates and those under its \
             state_prefix; delete the offending key or change the table's key template, then start pgferry again. {tail}"
        ))
    }

    /// Invalidate-mode TRUNCATE: deletes every key the table's template
    /// could have produced (`SCAN MATCH` on its pattern, then a check of
    /// each key's shape).
    async fn delete_matching(
        &mut self,
        conn: &mut ConnectionManager,
        rule: &TableRule,
    ) -> Result<(), SinkError> {
        let pattern = rule.template.glob();
        let mut cursor: u64 = 0;
        let mut deleted = 0usize;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
                .await
                .map_err(|e| self.classify(e, "scanning keys for a TRUNCATE"))?;
            let keys: Vec<&[u8]> = keys
                .iter()
                .filter(|k| std::str::from_utf8(k).is_ok_and(|k| rule.template.matches(k)))
                .map(|k| k.as_slice())
                .collect();
            if !keys.is_empty() {
                deleted += keys.len();
                redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<()>(conn)
                    .await
                    .map_err(|e| self.classify(e, "deleting keys for a TRUNCATE"))?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        tracing::info!(sink = %self.name, table = %rule.qualified, keys = deleted, "TRUNCATE: invalidated the table's keys");
        Ok(())
    }

    /// Transient for what waiting can fix (the network, a restarting or
    /// busy server), fatal for what needs the operator.
    /// The `RedisError` is kept as the cause.
    fn classify(&self, e: RedisError, what: &str) -> SinkError {
        let class = self.class_of(&e, what);
        class.caused_by(e)
    }

    fn class_of(&self, e: &RedisError, what: &str) -> SinkError {
        let msg = format!("Redis at {}, {what}: {e}", self.url);
        if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
        {
            return SinkError::transient(msg);
        }
        match e.kind() {
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::ReadOnly,
            )
            | ErrorKind::Parse => SinkError::transient(msg),
            ErrorKind::AuthenticationFailed => SinkError::fatal(format!(
                "{msg}; check the user and password in the sink's url"
            )),
            ErrorKind::Server(ServerErrorKind::NoPerm) => SinkError::fatal(format!(
                "{msg}; the ACL user needs the commands GET SET DEL UNLINK EXPIRE HSET HDEL SADD SREM SPOP SCAN EVAL MULTI EXEC on the cached keys"
            )),
            _ => match e.code() {
                Some("OOM" | "BUSY" | "LOADING" | "MISCONF" | "NOREPLICAS") => SinkError::transient(msg),
                Some("WRONGPASS" | "NOAUTH") => SinkError::fatal(format!(
                    "{msg}; check the user and password in the sink's url"
                )),
                _ => SinkError::fatal(format!("{msg}; retrying cannot help, fix the cause and start pgferry again")),
            },
        }
    }
}

/// "HSET on key \"product:1\"": command `i` of the pipeline, for messages.
fn describe(pipe: &redis::Pipeline, i: usize) -> String {
    let Some(cmd) = pipe.cmd_iter().nth(i) else {
        return format!("command {i}");
    };
    let args: Vec<String> = cmd
        .args_iter()
        .take(5)
        .map(|a| match a {
            redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
            _ => "?".into(),
        })
        .collect();
    match args.first().map(String::as_str) {
        Some("EVAL") => format!(
            "a pgferry script on key {:?}",
            args.get(3).cloned().unwrap_or_default()
        ),
        Some(name) => format!(
            "{name} on key {:?}",
            args.get(1).cloned().unwrap_or_default()
        ),
        None => format!("command {i}"),
    }
}

/// Renders the batch into units (on a blocking thread). Transactions at or
/// below `start` are skipped: Redis already holds them.
fn produce(
    txns: Vec<Arc<Transaction>>,
    rules: Arc<Rules>,
    start: Position,
    tx: mpsc::Sender<Unit>,
) -> Result<(), SinkError> {
    let mut b = Builder::new(rules);
    let mut last = start;
    // The consumer stopped (it failed): stop quietly, it reports the error.
    let mut stopped = false;
    for txn in &txns {
        let commit = txn.meta.commit_lsn;
        if commit < start.commit {
            continue;
        }
        let skip = if commit == start.commit {
            start.changes
        } else {
            0
        };
        let mut seen = 0u64;
        let mut failed = None;
        let read = txn.for_each_change(|c| {
            seen += 1;
            if seen <= skip {
                return Ok(());
            }
            if let Err(e) = b.add(c) {
                failed = Some(e);
                return Err(std::io::Error::other("stopped"));
            }
            if b.hard_full() {
                // A large transaction: split it; the position records how
                // far into it Redis is.
                let unit = b.take(Position {
                    commit,
                    changes: seen,
                });
                if tx.blocking_send(unit).is_err() {
                    stopped = true;
                    return Err(std::io::Error::other("stopped"));
                }
            }
            Ok(())
        });
        if stopped {
            return Ok(());
        }
        if let Some(e) = failed {
            return Err(e);
        }
        read.map_err(|e| SinkError::transient(format!("reading a spilled transaction: {e}")))?;
        if seen >= skip {
            last = Position {
                commit,
                changes: seen,
            };
        }
        if b.soft_full() && tx.blocking_send(b.take(last)).is_err() {
            return Ok(());
        }
    }
    if !b.is_empty() {
        let _ = tx.blocking_send(b.take(last));
    }
    Ok(())
}

#[async_trait::async_trait]
impl Sink for RedisSink {
    async fn apply(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError> {
        let res = self.apply_inner(batch).await;
        if res.is_err() {
            // Whether the last EXEC ran is unknown: ask Redis next time.
            self.position = None;
        }
        res
    }

    /// A checkpoint implies the position key: when no change of our tables
    /// came by yet, the position of the last transaction passed (or the
    /// empty position) is written now, without overwriting one Redis
    /// already holds.
    async fn flush(&mut self) -> Result<(), SinkError> {
        if self.had_position {
            return Ok(());
        }
        // Nothing passed yet (only idle positions): "holds nothing".
        let p = self.passed.unwrap_or_default();
        let mut conn = self.connection().await?;
        let key = self.rules.position_key.clone();
        redis::cmd("SET")
            .arg(&key)
            .arg(position::encode(p, &self.rules.owner))
            .arg("NX")
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.classify(e, "writing the position"))?;
        self.had_position = true;
        Ok(())
    }

    async fn lost_state(&mut self) -> Result<Option<String>, SinkError> {
        let mut conn = self.connection().await?;
        let key = self.rules.position_key.clone();
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.classify(e, "checking the position"))?;
        Ok((!exists).then(|| {
            format!(
                "Redis at {} no longer holds {key:?} (it restarted without persistence, was flushed, or failed over to a replica that was behind)",
                self.url
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    //! Against a real `redis-server` (started here, on a free port), with
    //! transactions built by hand: what end-to-end tests cannot force, such
    //! as a replay of transactions Redis already holds.

    use super::*;
    use crate::event::{fixtures, BeforeKind, Cell, Change, Op, RelationInfo, Row};
    use crate::lsn::Lsn;
    use std::process::{Child, Command, Stdio};

    struct Server {
        child: Child,
        port: u16,
        _dir: tempfile::TempDir,
    }

    impl Server {
        fn start() -> Server {
            let dir = tempfile::tempdir().unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let bin =
                std::env::var("PGFERRY_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
            let child = Command::new(bin)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is needed for these tests: apt-get install redis-server, or set PGFERRY_REDIS_SERVER");
            let s = Server {
                child,
                port,
                _dir: dir,
            };
            for _ in 0..200 {
                if let Ok(mut c) = s.conn() {
                    if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                        return s;
                    }
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            panic!("redis-server did not start");
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        fn conn(&self) -> redis::RedisResult<redis::Connection> {
            redis::Client::open(self.url())?.get_connection()
        }

        /// Every key and its value (strings; hashes as sorted field=value lists).
        fn dump(&self) -> Vec<(String, String)> {
            let mut c = self.conn().unwrap();
            let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
            keys.sort();
            keys.into_iter()
                .map(|k| {
                    let t: String = redis::cmd("TYPE").arg(&k).query(&mut c).unwrap();
                    let v = match t.as_str() {
                        "string" => redis::cmd("GET").arg(&k).query(&mut c).unwrap(),
                        "hash" => {
                            let m: std::collections::BTreeMap<String, String> =
                                redis::cmd("HGETALL").arg(&k).query(&mut c).unwrap();
                            format!("{m:?}")
                        }
                        "set" => {
                            let mut m: Vec<String> =
                                redis::cmd("SMEMBERS").arg(&k).query(&mut c).unwrap();
                            m.sort();
                            format!("{m:?}")
                        }
                        other => other.to_string(),
                    };
                    (k, v)
                })
                .collect()
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn rel() -> Arc<RelationInfo> {
        Arc::new(RelationInfo::new(
            7,
            "public".into(),
            "docs".into(),
            b'd',
            vec![
                ("id".into(), 23, true),
                ("body".into(), 25, false),
                ("n".into(), 1700, false),
            ],
        ))
    }

    /// `None`: unchanged TOAST; `Some(None)`: NULL; `Some(Some(json))`.
    fn row(cells: &[Option<Option<&str>>]) -> Row {
        let mut r = Row::default();
        for c in cells {
            match c {
                None => r.cells.push(Cell::Unchanged),
                Some(None) => r.cells.push(Cell::Null),
                Some(Some(json)) => {
                    let start = r.buf.len() as u32;
                    r.buf.extend_from_slice(json.as_bytes());
                    r.cells.push(Cell::Value {
                        start,
                        end: r.buf.len() as u32,
                    });
                }
            }
        }
        r
    }

    fn change(op: Op, before: Option<Row>, after: Option<Row>) -> Change {
        Change {
            op,
            rel: rel(),
            lsn: Lsn(1),
            xid: 1,
            before: before.map(|r| (BeforeKind::Key, r)),
            after,
        }
    }

    fn txn(commit: u64, changes: Vec<Change>) -> Arc<Transaction> {
        Arc::new(fixtures::txn(commit as u32, commit, commit + 1, changes))
    }

    fn owner(slot: &str) -> StreamOwner {
        StreamOwner {
            system_identifier: "7301".into(),
            database: "app".into(),
            slot: slot.into(),
        }
    }

    async fn sink_of(url: &str, mode: &str, slot: &str) -> RedisSink {
        let cfg: RedisConfig = toml::from_str(&format!(
            "name = \"t\"\nurl = \"{url}\"\ntimeout_secs = 2\n[tables.\"public.docs\"]\nkey = \"doc:{{id}}\"\nmode = \"{mode}\"\n"
        ))
        .unwrap();
        RedisSink::open(&cfg, owner(slot)).await.unwrap()
    }

    async fn sink(url: &str, mode: &str) -> RedisSink {
        sink_of(url, mode, "s").await
    }

    /// id 1 moves to 10 without sending its TOASTed body, then a new id 1
    /// is inserted. Replaying the move on the final state would copy the
    /// new row's body into doc:10; the position in Redis prevents it.
    #[tokio::test]
    async fn replays_of_applied_transactions_are_skipped() {
        let s = Server::start();
        for mode in ["json", "hash"] {
            let _: () = redis::cmd("FLUSHALL")
                .query(&mut s.conn().unwrap())
                .unwrap();
            let t0 = txn(
                100,
                vec![change(
                    Op::Insert,
                    None,
                    Some(row(&[
                        Some(Some("1")),
                        Some(Some("\"old body\"")),
                        Some(Some("1.50")),
                    ])),
                )],
            );
            let t1 = txn(
                200,
                vec![change(
                    Op::Update,
                    Some(row(&[Some(Some("1")), Some(None), Some(None)])),
                    Some(row(&[Some(Some("10")), None, Some(Some("2.50"))])),
                )],
            );
            let t2 = txn(
                300,
                vec![change(
                    Op::Insert,
                    None,
                    Some(row(&[
                        Some(Some("1")),
                        Some(Some("\"new body\"")),
                        Some(Some("3")),
                    ])),
                )],
            );
            let mut a = sink(&s.url(), mode).await;
            a.apply(&[t0.clone(), t1.clone(), t2.clone()])
                .await
                .unwrap();
            let once = s.dump();
            let doc10 = once.iter().find(|(k, _)| k == "doc:10").unwrap();
            assert!(
                doc10.1.contains("old body") && doc10.1.contains("2.50"),
                "{once:?}"
            );
            if mode == "json" {
                assert_eq!(doc10.1, r#"{"id":10,"body":"old body","n":2.50}"#);
            }
            // A restarted pgferry replays from an older checkpoint.
            let mut b = sink(&s.url(), mode).await;
            b.apply(&[t1.clone(), t2.clone()]).await.unwrap();
            assert_eq!(s.dump(), once, "{mode}: replay from t1");
            b.apply(&[t0, t1, t2]).await.unwrap();
            assert_eq!(s.dump(), once, "{mode}: replay from t0");
        }
    }

    /// A transaction split into units resumes after the last one applied.
    #[tokio::test]
    async fn a_position_inside_a_transaction_skips_its_applied_changes() {
        let s = Server::start();
        let n = 50u64;
        let changes: Vec<Change> = (1..=n)
            .map(|i| {
                let id = i.to_string();
                change(
                    Op::Insert,
                    None,
                    Some(row(&[
                        Some(Some(&id)),
                        Some(Some("\"b\"")),
                        Some(Some("1")),
                    ])),
                )
            })
            .collect();
        let t = txn(500, changes);
        let mut c = s.conn().unwrap();
        let at = |n| Position {
            commit: crate::lsn::Lsn(500),
            changes: n,
        };
        let _: () = redis::cmd("SET")
            .arg("pgferry:t:position")
            .arg(position::encode(at(20), &owner("s")))
            .query(&mut c)
            .unwrap();
        sink(&s.url(), "json")
            .await
            .apply(std::slice::from_ref(&t))
            .await
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg("doc:*").query(&mut c).unwrap();
        assert_eq!(keys.len() as u64, n - 20);
        assert!(!keys.contains(&"doc:20".to_string()) && keys.contains(&"doc:21".to_string()));
        let p: String = redis::cmd("GET")
            .arg("pgferry:t:position")
            .query(&mut c)
            .unwrap();
        assert_eq!(
            position::decode(&p),
            Some(Stored::Owned(at(50), owner("s"))),
            "{p}"
        );
        // A position of an older pgferry (no owner; its keys escaped more
        // characters) stops the sink with the steps to re-load.
        let _: () = redis::cmd("SET")
            .arg("pgferry:t:position")
            .arg("0/1F4 20")
            .query(&mut c)
            .unwrap();
        match sink(&s.url(), "json").await.apply(&[t]).await {
            Err(SinkError::Fatal { message: m, .. }) => assert!(m.contains("older pgferry"), "{m}"),
            other => panic!("expected a fatal error, got {other:?}"),
        }
    }

    /// Another stream's position (same state_prefix, another slot) is never
    /// trusted: the sink stops, and writes nothing.
    #[tokio::test]
    async fn a_position_of_another_stream_stops_the_sink() {
        let s = Server::start();
        let mut a = sink_of(&s.url(), "json", "a").await;
        let row = |id: &str| {
            change(
                Op::Insert,
                None,
                Some(row(&[Some(Some(id)), Some(Some("\"b\"")), Some(Some("1"))])),
            )
        };
        a.apply(&[txn(900, vec![row("1")])]).await.unwrap();
        let mut b = sink_of(&s.url(), "json", "b").await;
        match b.apply(&[txn(100, vec![row("2")])]).await {
            Err(SinkError::Fatal { message: m, .. }) => {
                assert!(m.contains("\"a\"") && m.contains("state_prefix"), "{m}")
            }
            other => panic!("expected a fatal error, got {other:?}"),
        }
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("doc:*")
            .query(&mut s.conn().unwrap())
            .unwrap();
        assert_eq!(keys, ["doc:1"]);
    }

    #[tokio::test]
    async fn a_key_of_the_wrong_type_is_fatal_and_the_position_is_not_advanced() {
        let s = Server::start();
        let mut c = s.conn().unwrap();
        let _: () = redis::cmd("SET")
            .arg("pgferry:t:keys:public.docs")
            .arg("not a set")
            .query(&mut c)
            .unwrap();
        let t = txn(
            100,
            vec![change(
                Op::Insert,
                None,
                Some(row(&[
                    Some(Some("1")),
                    Some(Some("\"b\"")),
                    Some(Some("1")),
                ])),
            )],
        );
        let err = sink(&s.url(), "json").await.apply(&[t]).await.unwrap_err();
        match err {
            SinkError::Fatal { message: m, .. } => {
                assert!(m.contains("WRONGTYPE") && m.contains("SADD"), "{m}")
            }
            other => panic!("expected fatal, got {other:?}"),
        }
        let p: Option<String> = redis::cmd("GET")
            .arg("pgferry:t:position")
            .query(&mut c)
            .unwrap();
        assert_eq!(p, None, "the position must not claim the failed unit");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_transient() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = txn(
            100,
            vec![change(
                Op::Insert,
                None,
                Some(row(&[
                    Some(Some("1")),
                    Some(Some("\"b\"")),
                    Some(Some("1")),
                ])),
            )],
        );
        let mut s = sink(&format!("redis://127.0.0.1:{port}"), "json").await;
        assert!(matches!(
            s.apply(std::slice::from_ref(&t)).await,
            Err(SinkError::Transient { .. })
        ));
        // A batch without a change for its tables does not need Redis at all.
        assert!(s.apply(&[txn(200, Vec::new())]).await.is_ok());
    }
}
