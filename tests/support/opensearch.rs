//! One real OpenSearch 2.19 node per test binary (see `tests/opensearch/`),
//! started on first use on a free loopback port with a temporary home.
//!
//! No JVM outlives the test binary: the JVM is started by a small shell
//! wrapper whose stdin is a pipe held by this process. When the process ends
//! (normally, by panic or by SIGKILL) the kernel closes the pipe, the wrapper
//! reads end-of-file, kills the JVM (SIGKILL: nothing in it is worth a clean
//! shutdown) and removes the node's home. The wrapper is the JVM's parent and
//! only reaps it after that kill, so the PID it signals cannot have been
//! reused.
//!
//! Tests share the node and use their own index names. A test that stops the
//! node ([`Node::exclusive`]) holds the write side of a lock that every other
//! test holds the read side of ([`Node::shared`]).

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Node {
    pub port: u16,
    home: tempfile::TempDir,
    proc: Mutex<Option<Wrapper>>,
    lock: RwLock<()>,
}

struct Wrapper {
    child: Child,
    /// Closing it makes the wrapper kill the JVM.
    stdin: Option<ChildStdin>,
}

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/opensearch")
}

/// Builds the launcher once per test binary (Maven; quiet on success).
fn build() {
    super::jvm::build("opensearch");
}

/// The node of this test binary, started on first use.
pub fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| {
        build();
        let node = Node {
            port: super::pg::free_port(),
            home: tempfile::Builder::new()
                .prefix("pgferry-os-")
                .tempdir()
                .unwrap(),
            proc: Mutex::new(None),
            lock: RwLock::new(()),
        };
        node.start();
        node
    })
}

const WRAPPER: &str = r#"
home=$1; port=$2; here=$3
java ${OPENSEARCH_JAVA_OPTS:--Xms512m -Xmx512m} -cp "$here/target/classes:$(cat "$here/target/cp.txt")" \
    Launcher "$home" "$port" </dev/null >>"$home/logs/node.log" 2>&1 &
pid=$!
echo "$pid" >"$home/java.pid"
while read -r _; do :; done
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
[ -e "$home/keep" ] || rm -rf "$home"
"#;

impl Node {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// For tests that leave the node running.
    pub fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().unwrap_or_else(|e| e.into_inner())
    }

    /// For a test that stops the node: no other test runs meanwhile.
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the JVM (same port, same home) and waits until it is green.
    pub fn start(&self) {
        let t = Instant::now();
        let home = self.home();
        std::fs::create_dir_all(home.join("logs")).unwrap();
        let _ = std::fs::remove_file(home.join("logs/ready"));
        let _ = std::fs::remove_file(home.join("java.pid"));
        let _ = std::fs::remove_file(home.join("keep"));
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WRAPPER)
            .arg("opensearch-wrapper")
            .arg(home)
            .arg(self.port.to_string())
            .arg(here())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the OpenSearch wrapper");
        let stdin = child.stdin.take();
        *self.proc.lock().unwrap() = Some(Wrapper { child, stdin });
        // A node that recovers many indices on a loaded machine can take
        // minutes: it fails only when its log stops growing for 60 s (or
        // after 300 s in all).
        let log_len = || std::fs::metadata(home.join("logs/node.log")).map_or(0, |m| m.len());
        let (mut seen, mut deadline) = (log_len(), Instant::now() + Duration::from_secs(60));
        let limit = Instant::now() + Duration::from_secs(300);
        loop {
            if log_len() != seen {
                seen = log_len();
                deadline = (Instant::now() + Duration::from_secs(60)).min(limit);
            }
            if home.join("logs/ready").exists() {
                match self.try_req(
                    "GET",
                    "/_cluster/health?wait_for_status=green&timeout=1s",
                    None,
                ) {
                    Ok((200, _)) => break,
                    // It answers but its shards are still recovering (408), which
                    // can be quiet in the log for a minute on a loaded machine:
                    // an answering node is making progress, up to the 300 s limit.
                    Ok(_) => deadline = (Instant::now() + Duration::from_secs(60)).min(limit),
                    Err(_) => {}
                }
            }
            let dead = self
                .proc
                .lock()
                .unwrap()
                .as_mut()
                .is_none_or(|w| matches!(w.child.try_wait(), Ok(Some(_))));
            assert!(
                !dead && Instant::now() < deadline,
                "OpenSearch did not start; end of its log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "opensearch node up on port {} in {:?}",
            self.port,
            t.elapsed()
        );
    }

    /// Kills the JVM with SIGKILL, as a crash would, and waits until it is gone.
    pub fn kill(&self) {
        let mut guard = self.proc.lock().unwrap();
        let Some(mut w) = guard.take() else { return };
        if let Ok(pid) = std::fs::read_to_string(self.home().join("java.pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
        // The wrapper reaps the JVM and exits, keeping the home.
        std::fs::write(self.home().join("keep"), "").unwrap();
        drop(w.stdin.take());
        let _ = w.child.wait();
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.home().join("logs/node.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// One HTTP request; `Err` when the node cannot be reached.
    pub fn try_req(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let url = format!("{}{path}", self.url());
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let body = body.map(|b| b.to_string());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap();
            let mut req = client.request(method, url);
            if let Some(b) = body {
                req = req.header("content-type", "application/json").body(b);
            }
            let resp = req.send().await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
            let v = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
            };
            Ok((status, v))
        })
    }

    /// One HTTP request that must reach the node.
    pub fn req(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.try_req(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log_tail()))
    }

    /// Every document of `index` as (id, _source), after a refresh. Empty when
    /// the index does not exist.
    pub fn docs(&self, index: &str) -> Vec<(String, Value)> {
        let (st, _) = self.req("POST", &format!("/{index}/_refresh"), None);
        if st == 404 {
            return Vec::new();
        }
        let (st, mut body) = self.req(
            "POST",
            &format!("/{index}/_search?scroll=1m"),
            Some(&serde_json::json!({"size": 2000, "sort": ["_doc"], "query": {"match_all": {}}})),
        );
        assert_eq!(st, 200, "{body}");
        let mut out = Vec::new();
        loop {
            let hits = body["hits"]["hits"].as_array().cloned().unwrap_or_default();
            if hits.is_empty() {
                break;
            }
            out.extend(
                hits.iter()
                    .map(|h| (h["_id"].as_str().unwrap().to_string(), h["_source"].clone())),
            );
            let id = body["_scroll_id"].clone();
            let (st, next) = self.req(
                "POST",
                "/_search/scroll",
                Some(&serde_json::json!({"scroll": "1m", "scroll_id": id})),
            );
            assert_eq!(st, 200, "{next}");
            body = next;
        }
        if let Some(id) = body["_scroll_id"].as_str() {
            let _ = self.try_req(
                "DELETE",
                "/_search/scroll",
                Some(&serde_json::json!({"scroll_id": [id]})),
            );
        }
        out
    }

    /// `_count` of `index` after a refresh (0 when it does not exist).
    pub fn count(&self, index: &str) -> u64 {
        let (st, _) = self.req("POST", &format!("/{index}/_refresh"), None);
        if st == 404 {
            return 0;
        }
        let (st, body) = self.req("GET", &format!("/{index}/_count"), None);
        assert_eq!(st, 200, "{body}");
        body["count"].as_u64().unwrap()
    }
}
