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
    /// Extra server arguments (TLS, ACL users).
    args: Vec<String>,
    /// The URL clients use.
    url: String,
    /// PEM of the CA that signed the server's certificate (TLS only).
    pub ca_pem: Option<PathBuf>,
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
        let port = super::pg::free_port();
        let mut r = TestRedis {
            dir,
            port,
            child: None,
            args: vec!["--port".into(), port.to_string()],
            url: format!("redis://127.0.0.1:{port}"),
            ca_pem: None,
        };
        r.start();
        r
    }

    /// A server that only speaks TLS (certificate for `localhost`, signed
    /// by a CA made here) and requires the ACL user `app` / `s3cret`.
    /// Clients use database `db`.
    pub fn tls_with_acl(db: u8) -> TestRedis {
        let dir = tempfile::Builder::new()
            .prefix("pgferry-redis-")
            .tempdir()
            .expect("temp dir");
        let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl is needed to make test certificates");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=pgferry test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.pem"),
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &p("server.key"),
            "-out",
            &p("server.csr"),
        ]);
        std::fs::write(
            p("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p("ext.cnf"),
            "-out",
            &p("server.pem"),
        ]);
        let port = super::pg::free_port();
        let args: Vec<String> = [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &p("server.pem"),
            "--tls-key-file",
            &p("server.key"),
            "--tls-ca-cert-file",
            &p("ca.pem"),
            "--tls-auth-clients",
            "no",
            "--user",
            "default",
            "off",
            "--user",
            "app",
            "on",
            ">s3cret",
            "~*",
            "&*",
            "+@all",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut r = TestRedis {
            ca_pem: Some(dir.path().join("ca.pem")),
            dir,
            port,
            child: None,
            args,
            url: format!("rediss://app:s3cret@localhost:{port}/{db}"),
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
            .args(&self.args)
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

    /// Kills the server (SIGKILL) and brings it back empty, as a server
    /// without persistence (or one that failed over to an empty replica).
    pub fn restart_empty(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.dir.path().join("dump.rdb"));
        self.start();
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
        self.url.clone()
    }

    fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        let client = match &self.ca_pem {
            Some(ca) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                redis::Client::build_with_tls(
                    self.url.as_str(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(std::fs::read(ca).unwrap()),
                    },
                )?
            }
            None => redis::Client::open(self.url.as_str())?,
        };
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
