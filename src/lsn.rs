//! Log sequence numbers.
//!
//! An [`Lsn`] is a byte position in the server's write-ahead log. Postgres prints
//! it as two hexadecimal halves, `X/Y` (high 32 bits / low 32 bits), and that is
//! the only text form pgferry reads or writes. Ordering is plain `u64` ordering,
//! which is also WAL order.

use std::fmt;
use std::str::FromStr;

/// A WAL position. `Lsn(0)` is Postgres's `InvalidXLogRecPtr` (`0/0`).
#[derive(Copy, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`, the invalid position.
    pub const ZERO: Lsn = Lsn(0);

    /// True for `0/0`.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

/// The text was not of the form `X/Y` with two hexadecimal halves of at most 8 digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal halves such as 16/B374D848")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let half = |h: &str| {
            if h.is_empty() || h.len() > 8 {
                return Err(err());
            }
            u32::from_str_radix(h, 16).map_err(|_| err())
        };
        Ok(Lsn(((half(hi)? as u64) << 32) | half(lo)? as u64))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_the_postgres_text_form() {
        for s in ["0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF", "0/1"] {
            assert_eq!(s.parse::<Lsn>().unwrap().to_string(), s);
        }
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap(), Lsn(0x16_B374_D848));
    }

    #[test]
    fn rejects_malformed_text() {
        for s in [
            "",
            "/",
            "1/",
            "/1",
            "G/0",
            "1/2/3",
            "123456789/0",
            "-1/0",
            "1",
        ] {
            assert!(s.parse::<Lsn>().is_err(), "{s:?} should not parse");
        }
    }

    #[test]
    fn orders_like_the_wal() {
        assert!("1/0".parse::<Lsn>().unwrap() > "0/FFFFFFFF".parse::<Lsn>().unwrap());
    }
}
