//! Runs the real `pgferry` binary against a test cluster and reads its output.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A working directory with a config file, a checkpoint dir and a JSONL output.
pub struct FerryDir {
    pub dir: tempfile::TempDir,
}

impl FerryDir {
    pub fn new() -> FerryDir {
        FerryDir {
            dir: tempfile::Builder::new()
                .prefix("pgferry-run-")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn jsonl(&self) -> PathBuf {
        self.path("changes.jsonl")
    }

    /// Writes `pgferry.toml` for `url`, replicating `tables` into the JSONL file.
    /// `extra_source` and `extra` are appended to `[source]` and to the file.
    /// Unless `extra` has its own `[metrics]`, the metrics endpoint listens on
    /// an ephemeral port, so that tests running side by side do not collide.
    pub fn write_config(
        &self,
        url: &str,
        tables: &[&str],
        extra_source: &str,
        extra: &str,
    ) -> PathBuf {
        self.write_config_slot(url, "pgferry", tables, extra_source, extra)
    }

    /// [`FerryDir::write_config`] with another slot name.
    pub fn write_config_slot(
        &self,
        url: &str,
        slot: &str,
        tables: &[&str],
        extra_source: &str,
        extra: &str,
    ) -> PathBuf {
        let tables: Vec<String> = tables.iter().map(|t| format!("\"{t}\"")).collect();
        let metrics = if extra.contains("[metrics]") {
            ""
        } else {
            "[metrics]\nlisten = \"127.0.0.1:0\"\n\n"
        };
        let text = format!(
            "[source]\nurl = \"{url}\"\nslot = \"{slot}\"\npublication = \"pgferry\"\ntables = [{}]\n{extra_source}\n\n\
             [checkpoint]\ndir = \"{}\"\n\n{metrics}[[sink]]\nname = \"changes\"\ntype = \"jsonl\"\npath = \"{}\"\n{extra}\n",
            tables.join(", "),
            self.path("state").display(),
            self.jsonl().display(),
        );
        let p = self.path("pgferry.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Starts `pgferry run`, with stderr appended to `pgferry.log`.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.spawn_env(args, &[])
    }

    pub fn spawn_env(&self, args: &[&str], env: &[(&str, &str)]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("pgferry.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgferry"));
        cmd.args(args)
            .arg("--config")
            .arg(self.path("pgferry.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .env("PGFERRY_LOG", "info,pgferry=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("start pgferry")
    }

    /// Runs a one-shot command (`check`, `slot status`, ...) with the config
    /// to completion (at most 60 s) and returns its exit status and output.
    pub fn command(&self, args: &[&str], env: &[(&str, &str)]) -> CommandOutput {
        let out = self.path("command.stdout");
        let err = self.path("command.stderr");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgferry"));
        cmd.args(args)
            .arg("--config")
            .arg(self.path("pgferry.toml"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start pgferry");
        let status = wait_or_kill(&mut child, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("pgferry {args:?} did not finish within 60 s"));
        CommandOutput {
            status,
            stdout: std::fs::read_to_string(&out).unwrap(),
            stderr: std::fs::read_to_string(&err).unwrap(),
        }
    }

    pub fn run(&self) -> Child {
        self.spawn(&["run"])
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("pgferry.log")).unwrap_or_default()
    }

    /// The change events of the JSONL output (every complete line but the
    /// `op:"schema"` and `op:"ddl"` ones), parsed.
    pub fn events(&self) -> Vec<Value> {
        read_jsonl(&self.jsonl())
    }

    /// Every complete line of the JSONL output, parsed, schema and ddl
    /// events included.
    pub fn all_events(&self) -> Vec<Value> {
        read_jsonl_all(&self.jsonl())
    }

    /// Waits until the output holds at least `n` events. Fails only when no
    /// new event came for `stall` (progress, not wall time: see
    /// [`super::progress`]).
    pub fn wait_events(&self, n: usize, stall: Duration) -> Vec<Value> {
        self.wait_events_until(stall, &format!("{n} events"), |ev| ev.len() >= n)
    }

    /// Waits until `done` holds for the events; fails only when no new
    /// event came for `stall`.
    pub fn wait_events_until(
        &self,
        stall: Duration,
        what: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        super::progress::wait_for(
            stall,
            || {
                let ev = self.events();
                if done(&ev) {
                    return Ok(ev);
                }
                Err(ev.len())
            },
            || {
                format!(
                    "waiting for {what}, have {} events:\n{}\n--- pgferry log ---\n{}",
                    self.events().len(),
                    self.events()
                        .iter()
                        .rev()
                        .take(5)
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("\n"),
                    self.log()
                )
            },
        )
    }
}

/// What a finished one-shot command printed.
#[derive(Debug)]
pub struct CommandOutput {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// The change events of a JSONL file: [`read_jsonl_all`] without the
/// `op:"schema"` and `op:"ddl"` events (which carry no row).
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    read_jsonl_all(path)
        .into_iter()
        .filter(|e| e["op"] != "schema" && e["op"] != "ddl")
        .collect()
}

/// Every complete line of a JSONL file, parsed.
pub fn read_jsonl_all(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Only complete lines: a writer may be in the middle of the last one.
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSONL line {l:?}: {e}")))
        .collect()
}

/// Sends SIGTERM and waits for the exit status.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    signal(child, "TERM")
}

/// Sends SIGINT (Ctrl-C) and waits for the exit status.
pub fn interrupt(child: &mut Child) -> std::process::ExitStatus {
    signal(child, "INT")
}

fn signal(child: &mut Child, sig: &str) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status();
    wait_or_kill(child, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("pgferry did not exit within 30 s of SIG{sig}"))
}

/// Kills with SIGKILL (kill -9).
pub fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits up to `timeout` for the child to exit, and returns its status;
/// `None` when it did not exit in time, and then it is KILLED (SIGKILL): for
/// a process that is expected to end. To ask whether it still runs, use
/// `child.try_wait()`, which leaves it alone.
pub fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the child when dropped, so a failing test leaves no process behind.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `pgferry run` and waits until its slot is active (it streams).
pub fn start_streaming(pg: &super::pg::TestPg, f: &FerryDir) -> Guard {
    let g = Guard(f.run());
    wait_active(pg, f, "pgferry");
    g
}

/// Waits until the slot is in use by a walsender.
pub fn wait_active(pg: &super::pg::TestPg, f: &FerryDir, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let q =
        format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name='{slot}' AND active");
    while pg.sql(&q).trim() != "1" {
        assert!(
            Instant::now() < deadline,
            "pgferry never started streaming:\n{}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
