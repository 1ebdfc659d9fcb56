//! A server process that cannot outlive the test binary.
//!
//! The server is started by a small shell wrapper whose stdin is a pipe held
//! by this process. When the test process ends (normally, by panic or by
//! SIGKILL) the kernel closes the pipe, the wrapper reads end-of-file, kills
//! the server with SIGKILL and removes its directory. The wrapper is the
//! server's parent and reaps it only after that kill, so the PID it signals
//! cannot have been reused.
//!
//! [`Guarded::kill`] and [`Guarded::stop`] end the server but keep its
//! directory (the wrapper is told `keep` first), so a test can start it again
//! on the same data, as a restarted server would come back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

const WRAPPER: &str = r#"
log=$1; pidfile=$2; cleanup=$3; shift 3
"$@" </dev/null >>"$log" 2>&1 &
pid=$!
echo "$pid" >"$pidfile"
keep=
while read -r line; do
    if [ "$line" = keep ]; then keep=1; break; fi
done
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
[ -n "$keep" ] || [ -z "$cleanup" ] || rm -rf "$cleanup"
"#;

pub struct Guarded {
    wrapper: Child,
    /// Closing it makes the wrapper kill the server.
    stdin: Option<ChildStdin>,
    pid: u32,
    log: PathBuf,
}

impl Guarded {
    /// Starts `program args…` with stdout and stderr appended to `log`. At the
    /// end of the test process `cleanup` (if not empty) is removed.
    pub fn spawn(program: &str, args: &[String], log: &Path, cleanup: &Path) -> Guarded {
        let pidfile = log.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut wrapper = Command::new("sh")
            .arg("-c")
            .arg(WRAPPER)
            .arg("watchdog")
            .arg(log)
            .arg(&pidfile)
            .arg(cleanup)
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program} under sh: {e}"));
        let stdin = wrapper.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            let text = std::fs::read_to_string(&pidfile).unwrap_or_default();
            if let Ok(pid) = text.trim().parse() {
                break pid;
            }
            assert!(
                Instant::now() < deadline,
                "the watchdog wrapper of {program} wrote no pid"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        Guarded {
            wrapper,
            stdin,
            pid,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// False once the server has exited (it stays a zombie until the wrapper
    /// reaps it, so `kill -0` cannot tell).
    pub fn alive(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            // The state follows the parenthesised command name.
            Ok(stat) => {
                !matches!(stat.rsplit(')').next().map(str::trim_start), Some(s) if s.starts_with('Z') || s.starts_with('X'))
            }
            Err(_) => false,
        }
    }

    /// Sends a signal (`-STOP`, `-CONT`, `-TERM`, …) to the server.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill {sig} {}", self.pid);
    }

    /// SIGKILL, as a crash would; the directory is kept.
    pub fn kill(mut self) {
        self.finish();
    }

    /// SIGTERM and a wait of at most `grace` for a clean exit, then SIGKILL;
    /// the directory is kept.
    pub fn stop(mut self, grace: Duration) {
        if self.alive() {
            self.signal("-TERM");
        }
        let deadline = Instant::now() + grace;
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"keep\n");
        }
        let _ = self.wrapper.wait();
    }

    /// The last `n` lines of the server's log.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }
}

impl Drop for Guarded {
    /// Ends the server (SIGKILL) and removes its directory.
    fn drop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = self.wrapper.wait();
        }
    }
}

/// The last `n` lines of a log file ("" when it cannot be read).
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
