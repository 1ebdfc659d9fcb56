//! A throwaway Redis server: `redis-server` on a free loopback port with its
//! own directory, no persistence configured, killed on drop.
//!
//! [`TestRedis::stop`] shuts it down with `SHUTDOWN SAVE` (the data goes to
//! `dump.rdb` in its directory) and [`TestRedis::start`] brings it back on
//! the same port with that data, as a restarted server with persistence
//! would come back. [`TestRedis::pause`] freezes it (SIGSTOP) instead, so
//! clients hit timeouts rather than refused connections.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestRedis {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

/// `$PGFERRY_REDIS_SERVER`, or `redis-server` from the PATH.
fn server_bin() -> PathBuf {
    std::env::var_os("PGFERRY_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

impl TestRedis {
    pub fn new() -> TestRedis {
        let dir = tempfile::Builder::new()
            .prefix("pgferry-redis-")
            .tempdir()
            .expect("temp dir");
        let mut r = TestRedis {
            dir,
            port: super::pg::free_port(),
            child: None,
        };
        r.start();
        r
    }

    /// Starts the server (again) on its port and waits until it answers PING.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))
            .unwrap();
        let child = Command::new(server_bin())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): install it (apt-get install redis-server) or set PGFERRY_REDIS_SERVER"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = self.try_conn() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Saves the data and exits (`SHUTDOWN SAVE`), as a graceful restart.
    pub fn stop(&mut self) {
        if let Ok(mut c) = self.try_conn() {
            let _ = redis::cmd("SHUTDOWN").arg("SAVE").query::<()>(&mut c);
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, replies stop.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let st = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(st.success());
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        client.get_connection_with_timeout(Duration::from_secs(2))
    }

    /// A fresh synchronous connection.
    pub fn conn(&self) -> redis::Connection {
        self.try_conn().expect("connect to the test Redis")
    }

    /// Every key (SCAN), sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut c = self.conn();
        let mut keys: Vec<String> = redis::cmd("SCAN")
            .cursor_arg(0)
            .arg("COUNT")
            .arg(1000)
            .clone()
            .iter::<String>(&mut c)
            .unwrap()
            .filter_map(Result::ok)
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// Starts `redis-cli MONITOR` writing to `monitor.log`.
    pub fn monitor(&self) -> (Child, PathBuf) {
        let path = self.dir.path().join("monitor.log");
        let out = std::fs::File::create(&path).unwrap();
        let child = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "MONITOR"])
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-cli MONITOR");
        (child, path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A paused server must be thawed to die of SIGKILL promptly.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
