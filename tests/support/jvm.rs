//! The JVM test servers' launchers (`tests/opensearch/`, `tests/kafka/`): small
//! Maven projects whose `build.sh` compiles a `Launcher` class and writes its
//! runtime classpath to `target/cp.txt`. Each is built once per test binary.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

/// `tests/<name>`
pub fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
}

/// Builds `tests/<name>` unless this test binary already did (Maven; quiet on success).
pub fn build(name: &str) {
    static BUILT: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if built.contains(name) {
        return;
    }
    let t = Instant::now();
    let out = Command::new(dir(name).join("build.sh"))
        .output()
        .unwrap_or_else(|e| panic!("run tests/{name}/build.sh (needs mvn and a JDK 17+): {e}"));
    assert!(
        out.status.success(),
        "tests/{name}/build.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{name} launcher built in {:?}", t.elapsed());
    built.insert(name.to_string());
}

/// The `-cp` value of the built launcher `tests/<name>`.
pub fn classpath(name: &str) -> String {
    let d = dir(name);
    let cp = std::fs::read_to_string(d.join("target/cp.txt")).expect("target/cp.txt (build first)");
    format!("{}:{}", d.join("target/classes").display(), cp.trim())
}
