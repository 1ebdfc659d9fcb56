//! Restart safety: kill -9 pgferry at random points during a continuous
//! workload, restart it, and compare the JSONL file with an independent
//! oracle (a second slot read through the server's `test_decoding` plugin).

mod support;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use support::ferry::{kill9, terminate, FerryDir, Guard};
use support::pg::TestPg;

#[test]
fn kill_9_at_random_points_loses_and_duplicates_nothing() {
    let pg = TestPg::start();
    pg.sql("CREATE TABLE ledger (id int PRIMARY KEY, v text, n int)");
    support::oracle::create(&pg);
    let f = FerryDir::new();
    f.write_config(&pg.url(), &["public.ledger"], "", "");
    let mut ferry = support::ferry::start_streaming(&pg, &f);

    // A continuous workload from three sessions: small and large transactions,
    // inserts, updates and deletes.
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A steady, bounded load: a few hundred transactions a second.
    let workers = support::workload::spawn(
        &pg,
        &rt,
        &stop,
        support::workload::Sessions {
            count: 3,
            seed: 0x9E37_79B9,
            pause: Duration::from_millis(5),
            on_error: support::workload::OnError::Panic,
        },
        |w| {
            let mut next = w as i32 * 10_000_000;
            move |rng, _| {
                let mut rnd = |n: u32| rng.below(n);
                let mut sql = String::from("BEGIN;");
                let big = rnd(50) == 0;
                let rows = if big { 2000 } else { 1 + rnd(5) };
                sql += &format!(
                    "INSERT INTO ledger SELECT i, md5(i::text), 0 FROM generate_series({}, {}) i;",
                    next + 1,
                    next + rows as i32
                );
                next += rows as i32;
                if rnd(2) == 0 {
                    sql += &format!(
                        "UPDATE ledger SET n = n + 1 WHERE id = {};",
                        next - rnd(rows) as i32
                    );
                }
                if rnd(3) == 0 {
                    sql += &format!("DELETE FROM ledger WHERE id = {};", next - rnd(rows) as i32);
                }
                sql += "COMMIT;";
                vec![sql]
            }
        },
    );

    // Kill -9 five times at random moments, restarting each time.
    let mut seed = 12345u64;
    for round in 0..5 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let wait = 300 + (seed >> 33) % 2500;
        std::thread::sleep(Duration::from_millis(wait));
        kill9(&mut ferry.0);
        eprintln!(
            "round {round}: killed after {wait} ms, {} events on file",
            f.events().len()
        );
        ferry = Guard(f.run());
    }
    std::thread::sleep(Duration::from_millis(1000));
    let txns = support::workload::stop(&rt, &stop, workers);
    pg.sql("INSERT INTO ledger VALUES (-1, 'marker', 0)");

    let expected = support::oracle::read(&pg, "ledger");
    assert!(txns > 100, "the workload ran only {txns} transactions");
    assert_eq!(expected.last().map(|t| t.2), Some(-1));
    // Until every change is in, or none came for two minutes.
    support::progress::wait_for(
        Duration::from_secs(120),
        || match support::oracle::jsonl(&f, "ledger").len() {
            n if n >= expected.len() => Ok(()),
            n => Err(n),
        },
        || f.log(),
    );
    assert!(terminate(&mut ferry.0).success(), "{}", f.log());
    let got = support::oracle::jsonl(&f, "ledger");
    assert_eq!(got.len(), expected.len(), "same number of changes");
    if let Some(i) = got.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!(
            "first difference at change {i}: pgferry {:?} vs oracle {:?}",
            got[i], expected[i]
        );
    }
    // The file is whole lines only.
    let text = std::fs::read_to_string(f.jsonl()).unwrap();
    assert!(text.ends_with('\n'));
}
