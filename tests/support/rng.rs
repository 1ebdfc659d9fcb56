//! A tiny deterministic random source for test workloads (xorshift32): the
//! same seed gives the same workload on every run, with no extra dependency.

pub struct XorShift(u32);

impl XorShift {
    /// A zero seed would stay zero forever, so it is replaced.
    pub fn new(seed: u32) -> XorShift {
        XorShift(if seed == 0 { 0x9E37_79B9 } else { seed })
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0 % n
    }
}
