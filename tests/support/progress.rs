//! Waiting on progress, not on wall time. A wait fails only when what it
//! watches has not moved for a while (`stall`): on a loaded machine a test
//! gets slower, never red, and a hang still fails.

use std::fmt::Debug;
use std::time::{Duration, Instant};

/// Polls `probe` every 50 ms until it returns `Ok(value)`. While it returns
/// `Err(measure)` (anything that shows progress: a count, a position, a
/// set of differences), the wait goes on as long as the measure keeps
/// changing; once it has stayed the same for `stall`, the wait panics with
/// `describe()` and the last measure.
pub fn wait_for<T, P: PartialEq + Debug>(
    stall: Duration,
    mut probe: impl FnMut() -> Result<T, P>,
    describe: impl Fn() -> String,
) -> T {
    let mut last: Option<P> = None;
    let mut since = Instant::now();
    loop {
        match probe() {
            Ok(v) => return v,
            Err(p) => {
                if last.as_ref() != Some(&p) {
                    last = Some(p);
                    since = Instant::now();
                } else if since.elapsed() > stall {
                    panic!(
                        "no progress for {} s (still at {:?}): {}",
                        stall.as_secs(),
                        last,
                        describe()
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
