//! A throwaway NATS server with JetStream: Debian's `nats-server -js` on a
//! free loopback port with its own store directory, killed on drop and, through
//! [`super::watchdog`], with the test process even on SIGKILL.
//!
//! [`TestNats::kill`] (SIGKILL) or [`TestNats::stop`] (SIGTERM, a clean exit)
//! keep the store, and [`TestNats::start`] brings the server back on the same
//! port with its streams, as a restarted server would come back.
//! [`TestNats::pause`] freezes it (SIGSTOP) instead, so clients hit timeouts
//! rather than refused connections.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use super::watchdog::Guarded;

pub struct TestNats {
    pub dir: tempfile::TempDir,
    pub port: u16,
    proc: Option<Guarded>,
    /// A server config file (`-c`), for limits and users; flags override it.
    config: Option<PathBuf>,
}

/// `$PGFERRY_NATS_SERVER`, or `nats-server` from the PATH.
fn server_bin() -> String {
    std::env::var("PGFERRY_NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

impl TestNats {
    pub fn new() -> TestNats {
        Self::with_config("")
    }

    /// A server that also reads `conf` (nats-server's config syntax, e.g.
    /// `max_payload: 4096` or an `authorization` block); empty: none.
    pub fn with_config(conf: &str) -> TestNats {
        let dir = tempfile::Builder::new()
            .prefix("pgferry-nats-")
            .tempdir()
            .expect("temp dir");
        let config = (!conf.is_empty()).then(|| {
            let p = dir.path().join("nats.conf");
            std::fs::write(&p, conf).expect("write nats.conf");
            p
        });
        let mut n = TestNats {
            dir,
            port: super::pg::free_port(),
            proc: None,
            config,
        };
        n.start();
        n
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// JetStream's store directory (streams live under `jetstream/` in it).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// Starts the server (again) on its port and store, and waits until it
    /// reports ready and accepts connections.
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "nats-server is already running");
        // A fresh log, so that "Server is ready" is this start's.
        let _ = std::fs::remove_file(self.log());
        let mut args: Vec<String> = [
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-sd",
            self.store_dir().to_str().unwrap(),
            "--server_name",
            "pgferry-test",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(c) = &self.config {
            args.extend(["-c".to_string(), c.to_str().unwrap().to_string()]);
        }
        let bin = server_bin();
        // The temp dir removes itself on drop; the watchdog cleans nothing.
        let proc = Guarded::spawn(&bin, &args, &self.log(), Path::new(""));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(self.log()).unwrap_or_default();
            if log.contains("Server is ready")
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                break;
            }
            assert!(
                proc.alive() && Instant::now() < deadline,
                "{bin} did not start (install it: apt-get install nats-server, or set \
                 PGFERRY_NATS_SERVER); end of its log:\n{}",
                proc.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.proc = Some(proc);
    }

    /// SIGKILL, as a crash would; the store is kept.
    pub fn kill(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill();
        }
    }

    /// A clean shutdown (SIGTERM), SIGKILL after 20 s; the store is kept.
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.stop(Duration::from_secs(20));
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, replies stop.
    pub fn pause(&self) {
        self.running().signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.running().signal("-CONT");
    }

    fn running(&self) -> &Guarded {
        self.proc.as_ref().expect("nats-server is not running")
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        super::watchdog::log_tail(&self.log(), 40)
    }

    /// Every message of `stream`, in stream order.
    pub fn read_stream(&self, stream: &str) -> Vec<Msg> {
        read_stream_as(&self.url(), async_nats::ConnectOptions::new, stream)
    }
}

/// Every message of `stream` at `url`, connecting with `opts()` (an
/// authenticated or TLS server), in stream order.
pub fn read_stream_as(
    url: &str,
    opts: impl Fn() -> async_nats::ConnectOptions,
    stream: &str,
) -> Vec<Msg> {
    use async_nats::jetstream;
    let rt = super::workload::runtime();
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = opts().connect(url).await.unwrap();
        let js = jetstream::new(client);
        let mut stream = js.get_stream(stream).await.unwrap();
        let total = stream.info().await.unwrap().state.messages as usize;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::Config {
                ack_policy: jetstream::consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut msgs = consumer.messages().await.unwrap();
        let mut out = Vec::with_capacity(total);
        while out.len() < total {
            let m = tokio::time::timeout(Duration::from_secs(30), msgs.next())
                .await
                .expect("the stream's messages come")
                .unwrap()
                .unwrap();
            let h = m.headers.clone().expect("headers");
            let get = |k: &str| h.get(k).map(|v| v.as_str().to_string());
            out.push(Msg {
                subject: m.subject.to_string(),
                id: get("Nats-Msg-Id").expect("Nats-Msg-Id"),
                table: get("table").expect("table header"),
                key: get("key"),
                value: serde_json::from_slice(&m.payload).expect("a JSON value"),
            });
        }
        out
    })
}

/// An operator-mode server set-up made here, as `nsc` would: an operator,
/// an account with JetStream and a user signed by it. Returns the server
/// config lines and the user's `.creds` file text.
pub fn operator_mode() -> (String, String) {
    use nkeys::KeyPair;
    let operator = KeyPair::new_operator();
    let account = KeyPair::new_account();
    let system = KeyPair::new_account();
    let user = KeyPair::new_user();
    let op = jwt(
        &operator,
        &operator.public_key(),
        "O",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
    });
    let acc = jwt(
        &operator,
        &account.public_key(),
        "A",
        serde_json::json!({"limits": unlimited, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2}),
    );
    let usr = jwt(
        &account,
        &user.public_key(),
        "U",
        serde_json::json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}),
    );
    // JetStream needs a system account in operator mode.
    let sys = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2}),
    );
    let conf = format!(
        "operator: \"{op}\"\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{acc}\"\n  {}: \"{sys}\"\n}}\n",
        system.public_key(),
        account.public_key(),
        system.public_key()
    );
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{usr}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    );
    (conf, creds)
}

/// A NATS JWT (`ed25519-nkey`) for `sub`, signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, sub: &str, name: &str, nats: Value) -> String {
    let b64 = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "jti": data_encoding::BASE32_NOPAD.encode(format!("{sub}{iat}").as_bytes()),
        "iat": iat, "iss": issuer.public_key(), "name": name, "sub": sub, "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        b64(claims.to_string().as_bytes())
    );
    let sig = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64(&sig))
}

impl Drop for TestNats {
    /// Kills the server before its directory goes.
    fn drop(&mut self) {
        drop(self.proc.take());
    }
}

impl Default for TestNats {
    fn default() -> Self {
        Self::new()
    }
}

/// One message read back from the stream.
#[derive(Debug)]
pub struct Msg {
    pub subject: String,
    pub id: String,
    pub table: String,
    pub key: Option<String>,
    pub value: Value,
}
