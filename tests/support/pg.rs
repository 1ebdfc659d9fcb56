//! A throwaway PostgreSQL cluster: `initdb` into a temporary directory,
//! `wal_level=logical`, a free loopback port, stopped (immediately) on drop.
//!
//! `initdb` and `postgres` refuse to run as root. When the effective uid is 0
//! (as in CI) the server binaries run as the unprivileged `postgres` user
//! through `runuser`, and the data directory is handed to that user.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub struct TestPg {
    pub dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    run_as: Option<String>,
    /// Started with [`PgOptions::ssl`]: the harness's own connections
    /// (psql, [`TestPg::client`], workloads) go through the Unix socket.
    ssl: bool,
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: `$PGFERRY_PG_BIN`, or the
/// newest `/usr/lib/postgresql/*/bin`.
pub fn pg_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PGFERRY_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries not found under /usr/lib/postgresql: install the postgresql package or set PGFERRY_PG_BIN")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no /usr/lib/postgresql/<version>/bin/initdb found")
        .1
}

fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        let out = Command::new("id").arg("-u").output().expect("run id -u");
        String::from_utf8_lossy(&out.stdout).trim() == "0"
    })
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// Options for [`TestPg::start_with`].
#[derive(Default, Clone)]
pub struct PgOptions {
    /// Extra lines for postgresql.conf.
    pub conf: String,
    /// Replaces pg_hba.conf when set.
    pub hba: Option<String>,
    /// `ssl = on`, with certificates made by `openssl` in `<dir>/tls` (see
    /// [`TestPg::tls_file`]): a CA (`ca.pem`), a server certificate it signs
    /// for `localhost` and `127.0.0.1` (`server.pem`, `server.key`), a
    /// client certificate for the role `certuser` (`client.pem`,
    /// `client.key`) and an unrelated CA (`other-ca.pem`). The server
    /// trusts `ca.pem` for client certificates.
    pub ssl: bool,
}

impl TestPg {
    /// A cluster with `wal_level=logical` and trust authentication on loopback.
    pub fn start() -> TestPg {
        Self::start_with(PgOptions::default())
    }

    pub fn start_with(opts: PgOptions) -> TestPg {
        let dir = tempfile::Builder::new()
            .prefix("pgferry-pg-")
            .tempdir()
            .expect("temp dir");
        let run_as = running_as_root().then(|| "postgres".to_string());
        if let Some(user) = &run_as {
            let st = Command::new("chown")
                .args(["-R", &format!("{user}:"), dir.path().to_str().unwrap()])
                .status()
                .expect("chown");
            assert!(st.success(), "chown of the test data directory failed");
        }
        let mut pg = TestPg {
            port: free_port(),
            bin: pg_bin_dir(),
            run_as,
            dir,
            ssl: opts.ssl,
        };
        let data = pg.data_dir();
        pg.run_checked(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{sock}'\n\
             wal_level = logical\nmax_wal_senders = 20\nmax_replication_slots = 20\n\
             fsync = off\nfull_page_writes = off\nsynchronous_commit = on\n\
             logical_decoding_work_mem = 64kB\nshared_buffers = 64MB\n\
             log_min_messages = warning\nlogging_collector = off\n{extra}\n",
            port = pg.port,
            sock = pg.dir.path().display(),
            extra = opts.conf
        );
        append(&data.join("postgresql.conf"), &conf);
        if opts.ssl {
            let tls = pg.make_tls_files();
            let d = tls.display();
            append(
                &data.join("postgresql.conf"),
                &format!(
                    "ssl = on\nssl_cert_file = '{d}/server.pem'\nssl_key_file = '{d}/server.key'\nssl_ca_file = '{d}/ca.pem'\n"
                ),
            );
        }
        if let Some(hba) = &opts.hba {
            std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        }
        pg.start_server();
        pg
    }

    /// A file made for [`PgOptions::ssl`], e.g. `ca.pem`.
    pub fn tls_file(&self, name: &str) -> PathBuf {
        self.dir.path().join("tls").join(name)
    }

    fn make_tls_files(&self) -> PathBuf {
        let dir = self.dir.path().join("tls");
        std::fs::create_dir_all(&dir).unwrap();
        make_certs(&dir);
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let args = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
        let run = |a: Vec<String>| openssl(&dir, &a.iter().map(String::as_str).collect::<Vec<_>>());
        run(args(&format!(
            "req -x509 {ec} -keyout other-ca.key -out other-ca.pem -days 2 -subj /CN=unrelated-CA"
        )));
        run(args(&format!(
            "req {ec} -keyout client.key -out client.csr -subj /CN=certuser"
        )));
        std::fs::write(
            dir.join("client.cnf"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        run(args(
            "x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 -extfile client.cnf",
        ));
        if let Some(user) = &self.run_as {
            let st = Command::new("chown")
                .args(["-R", &format!("{user}:"), dir.to_str().unwrap()])
                .status()
                .expect("chown");
            assert!(st.success(), "chown of the TLS files failed");
        }
        for key in ["server.key", "client.key"] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join(key), std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        dir
    }

    /// A URL for the harness's own connections: the Unix socket when the
    /// server has [`PgOptions::ssl`] (its TCP lines may demand TLS), else
    /// [`TestPg::url`].
    pub fn admin_url(&self) -> String {
        if self.ssl {
            format!(
                "host={} port={} user=postgres dbname=postgres",
                self.dir.path().display(),
                self.port
            )
        } else {
            self.url()
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `pg_ctl -D <data> -l <log> -w <args>`.
    fn pg_ctl(&self, args: &[&str]) -> Output {
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        let mut all = vec![
            "-D",
            data.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-w",
        ];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
    }

    fn pg_ctl_checked(&self, args: &[&str]) {
        let out = self.pg_ctl(args);
        assert!(
            out.status.success(),
            "pg_ctl {args:?} failed: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Starts (or restarts) the server and waits until it accepts connections.
    pub fn start_server(&mut self) {
        self.pg_ctl_checked(&["-t", "60", "start"]);
    }

    /// Stops the server at once (`-m immediate`), as a crash would.
    pub fn stop_server(&self) {
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
    }

    /// `pg_ctl restart -m fast`: a routine restart; returns once the server
    /// accepts connections again.
    pub fn restart_fast(&self) {
        self.pg_ctl_checked(&["-m", "fast", "-t", "60", "restart"]);
    }

    /// `pg_ctl stop -m fast`, waiting at most `timeout_secs`: whether the
    /// server stopped in that time, and how long it took.
    pub fn stop_fast(&self, timeout_secs: u32) -> (bool, std::time::Duration) {
        let started = std::time::Instant::now();
        let out = self.pg_ctl(&["-m", "fast", "-t", &timeout_secs.to_string(), "stop"]);
        (out.status.success(), started.elapsed())
    }

    /// The pid of the walsender that holds `slot`, if one does.
    pub fn slot_pid(&self, slot: &str) -> Option<i32> {
        self.sql(&format!(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .trim()
        .parse()
        .ok()
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        self.url_for("postgres", "postgres")
    }

    pub fn url_for(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs SQL through `psql -X -At -v ON_ERROR_STOP=1` and returns its output.
    pub fn sql(&self, sql: &str) -> String {
        self.sql_in("postgres", sql)
    }

    /// [`TestPg::sql`] in database `db`.
    pub fn sql_in(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                &if self.ssl {
                    self.dir.path().display().to_string()
                } else {
                    "127.0.0.1".to_string()
                },
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed for {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("psql output is UTF-8")
    }

    /// An ordinary SQL connection (its driver task runs on the current runtime).
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.admin_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test cluster");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// The server log so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn command(&self, prog: &str) -> Command {
        let path = self.bin.join(prog);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn run(&self, prog: &str, args: &[&str]) -> Output {
        self.command(prog)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
    }

    fn run_checked(&self, prog: &str, args: &[&str]) {
        let out = self.run(prog, args);
        assert!(
            out.status.success(),
            "{prog} {args:?} failed: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        self.stop_server();
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open postgresql.conf");
    f.write_all(text.as_bytes())
        .expect("append postgresql.conf");
}

/// Runs `openssl` in `dir`; panics with its stderr when it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `ca.pem`, `server.pem` and `server.key` in `dir`.
pub fn make_certs(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"]);
    a.extend(["-subj", "/CN=pgferry test CA"]);
    openssl(dir, &a);
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend(["-keyout", "server.key", "-out", "server.csr"]);
    a.extend(["-subj", "/CN=localhost"]);
    openssl(dir, &a);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}
