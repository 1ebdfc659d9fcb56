//! EXPERIMENT (off by default): values in pgoutput's binary format
//! (`binary 'true'`, PG14+), rendered as `to_jsonb()` would.
//!
//! Only a few types have a decoder: `int2`, `int4`, `int8`, `bool`, `text`,
//! `varchar`, `bpchar`, `name`, `numeric`, `timestamptz`, `timestamp`,
//! `jsonb`, `json`, and one-dimensional or multi-dimensional arrays of
//! those. Scalars are turned into the type's text output and handed to the
//! text renderer ([`super::value::render`]), so the JSON rules are the
//! tested ones; arrays are rendered directly (jsonb's `[a, b]` spacing, NULL
//! elements as `null`, lower bounds ignored, as `to_jsonb()` does).
//!
//! With `binary 'true'` the server sends *every* column whose type has a
//! send function in binary, so this cannot be the default until every type
//! has an exact decoder; a type without one returns an error and the caller
//! keeps the raw bytes. See `benches/RESULTS.md` for what it measured.

use super::types::{TypeKind, TypeRegistry};
use super::value::{self, ValueError};
use crate::json_write::civil_from_days;

const BOOL: u32 = 16;
const NAME: u32 = 19;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const TEXT: u32 = 25;
const JSON: u32 = 114;
const BPCHAR: u32 = 1042;
const VARCHAR: u32 = 1043;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const NUMERIC: u32 = 1700;
const JSONB: u32 = 3802;

fn bad(kind: &'static str) -> ValueError {
    ValueError::Malformed {
        kind,
        reason: "bad binary value",
    }
}

fn array_element(reg: &TypeRegistry, oid: u32) -> Option<u32> {
    match reg.kind(oid) {
        Some(TypeKind::Array { elem, .. }) => Some(*elem),
        _ => None,
    }
}

fn scalar(oid: u32) -> bool {
    matches!(
        oid,
        BOOL | NAME
            | INT8
            | INT2
            | INT4
            | TEXT
            | JSON
            | BPCHAR
            | VARCHAR
            | TIMESTAMP
            | TIMESTAMPTZ
            | NUMERIC
            | JSONB
    )
}

/// Appends the JSON for the binary value `bin` of type `oid`. On error `out`
/// is left as it was.
pub fn render(
    reg: &TypeRegistry,
    oid: u32,
    bin: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ValueError> {
    let start = out.len();
    let mut text = Vec::new();
    let res = render_at(reg, oid, bin, out, &mut text);
    if res.is_err() {
        out.truncate(start);
    }
    res
}

fn render_at(
    reg: &TypeRegistry,
    oid: u32,
    bin: &[u8],
    out: &mut Vec<u8>,
    text: &mut Vec<u8>,
) -> Result<(), ValueError> {
    if !scalar(oid) {
        if array_element(reg, oid).is_some() {
            return array(reg, bin, out, text);
        }
        return Err(bad("unsupported binary"));
    }
    text.clear();
    match oid {
        TEXT | VARCHAR | BPCHAR | NAME | JSON => return value::render(reg, oid, bin, out),
        JSONB => {
            let (&version, rest) = bin.split_first().ok_or(bad("jsonb"))?;
            if version != 1 {
                return Err(bad("jsonb"));
            }
            return value::render(reg, oid, rest, out);
        }
        BOOL => match bin {
            [0] => out.extend_from_slice(b"false"),
            [1] => out.extend_from_slice(b"true"),
            _ => return Err(bad("bool")),
        },
        INT2 => {
            let v = i16::from_be_bytes(bin.try_into().map_err(|_| bad("int2"))?);
            out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        }
        INT4 => {
            let v = i32::from_be_bytes(bin.try_into().map_err(|_| bad("int4"))?);
            out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        }
        INT8 => {
            let v = i64::from_be_bytes(bin.try_into().map_err(|_| bad("int8"))?);
            out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        }
        NUMERIC => {
            numeric_text(bin, text)?;
            return value::render(reg, oid, text, out);
        }
        TIMESTAMP | TIMESTAMPTZ => {
            let us = i64::from_be_bytes(bin.try_into().map_err(|_| bad("timestamp"))?);
            timestamp_text(us, oid == TIMESTAMPTZ, text);
            return value::render(reg, oid, text, out);
        }
        _ => return Err(bad("unsupported binary")),
    }
    Ok(())
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn i32(&mut self) -> Result<i32, ValueError> {
        let (h, t) = self.0.split_at_checked(4).ok_or(bad("array"))?;
        self.0 = t;
        Ok(i32::from_be_bytes(h.try_into().unwrap_or([0; 4])))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ValueError> {
        let (h, t) = self.0.split_at_checked(n).ok_or(bad("array"))?;
        self.0 = t;
        Ok(h)
    }
}

/// `array_send`: ndim, has-null flag, element type, (length, lower bound)
/// per dimension, then each element as a length (-1: NULL) and its bytes.
fn array(
    reg: &TypeRegistry,
    bin: &[u8],
    out: &mut Vec<u8>,
    text: &mut Vec<u8>,
) -> Result<(), ValueError> {
    let mut c = Cursor(bin);
    let ndim = c.i32()?;
    let _flags = c.i32()?;
    let elem = c.i32()? as u32;
    if ndim == 0 {
        out.extend_from_slice(b"[]");
        return Ok(());
    }
    if !(1..=6).contains(&ndim) || !scalar(elem) {
        return Err(bad("array"));
    }
    let mut dims = Vec::with_capacity(ndim as usize);
    for _ in 0..ndim {
        let n = c.i32()?;
        let _lbound = c.i32()?;
        if n < 0 {
            return Err(bad("array"));
        }
        dims.push(n as usize);
    }
    level(reg, elem, &dims, &mut c, out, text)?;
    if !c.0.is_empty() {
        return Err(bad("array"));
    }
    Ok(())
}

fn level(
    reg: &TypeRegistry,
    elem: u32,
    dims: &[usize],
    c: &mut Cursor<'_>,
    out: &mut Vec<u8>,
    text: &mut Vec<u8>,
) -> Result<(), ValueError> {
    out.push(b'[');
    for i in 0..dims[0] {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        if dims.len() > 1 {
            level(reg, elem, &dims[1..], c, out, text)?;
            continue;
        }
        let len = c.i32()?;
        if len < 0 {
            out.extend_from_slice(b"null");
        } else {
            let v = c.take(len as usize)?;
            render_at(reg, elem, v, out, text)?;
        }
    }
    out.push(b']');
    Ok(())
}

/// `numeric_send` to `numeric_out`'s text.
fn numeric_text(bin: &[u8], text: &mut Vec<u8>) -> Result<(), ValueError> {
    let mut c = Cursor(bin);
    let head = c.take(8).map_err(|_| bad("numeric"))?;
    let ndigits = i16::from_be_bytes([head[0], head[1]]);
    let weight = i16::from_be_bytes([head[2], head[3]]) as i32;
    let sign = u16::from_be_bytes([head[4], head[5]]);
    let dscale = u16::from_be_bytes([head[6], head[7]]) as i32;
    match sign {
        0xC000 => {
            text.extend_from_slice(b"NaN");
            return Ok(());
        }
        0xD000 => {
            text.extend_from_slice(b"Infinity");
            return Ok(());
        }
        0xF000 => {
            text.extend_from_slice(b"-Infinity");
            return Ok(());
        }
        0x0000 | 0x4000 => {}
        _ => return Err(bad("numeric")),
    }
    if ndigits < 0 || c.0.len() != 2 * ndigits as usize || dscale > 0x3FFF {
        return Err(bad("numeric"));
    }
    let digits: Vec<i32> =
        c.0.chunks_exact(2)
            .map(|d| i16::from_be_bytes([d[0], d[1]]) as i32)
            .collect();
    if digits.iter().any(|&d| !(0..10000).contains(&d)) {
        return Err(bad("numeric"));
    }
    let digit = |i: i32| -> i32 {
        if i >= 0 && (i as usize) < digits.len() {
            digits[i as usize]
        } else {
            0
        }
    };
    if sign == 0x4000 {
        text.push(b'-');
    }
    // Integer part: digits 0..=weight (base 10000).
    if weight < 0 {
        text.push(b'0');
    } else {
        for d in 0..=weight {
            let v = digit(d);
            if d == 0 {
                text.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
            } else {
                text.extend_from_slice(format!("{v:04}").as_bytes());
            }
        }
    }
    if dscale > 0 {
        text.push(b'.');
        let mut left = dscale;
        let mut d = weight + 1;
        while left > 0 {
            let s = format!("{:04}", digit(d));
            let n = left.min(4) as usize;
            text.extend_from_slice(&s.as_bytes()[..n]);
            left -= n as i32;
            d += 1;
        }
    }
    Ok(())
}

/// Microseconds since 2000-01-01 to `timestamp[tz]_out`'s ISO text in UTC.
fn timestamp_text(us: i64, tz: bool, text: &mut Vec<u8>) {
    if us == i64::MAX {
        text.extend_from_slice(b"infinity");
        return;
    }
    if us == i64::MIN {
        text.extend_from_slice(b"-infinity");
        return;
    }
    const DAY: i64 = 86_400_000_000;
    let date = us.div_euclid(DAY);
    let time = us.rem_euclid(DAY);
    let (y, m, d) = civil_from_days(date + 10_957); // 2000-01-01 is day 10957

    let (bc, year) = if y <= 0 { (true, 1 - y) } else { (false, y) };
    let secs = time / 1_000_000;
    let frac = time % 1_000_000;
    let s = format!(
        "{year:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    text.extend_from_slice(s.as_bytes());
    if frac != 0 {
        let f = format!("{frac:06}");
        text.push(b'.');
        text.extend_from_slice(f.trim_end_matches('0').as_bytes());
    }
    if tz {
        text.extend_from_slice(b"+00");
    }
    if bc {
        text.extend_from_slice(b" BC");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> String {
        let mut b = Vec::new();
        b.extend_from_slice(&ndigits.to_be_bytes());
        b.extend_from_slice(&weight.to_be_bytes());
        b.extend_from_slice(&sign.to_be_bytes());
        b.extend_from_slice(&dscale.to_be_bytes());
        for d in digits {
            b.extend_from_slice(&d.to_be_bytes());
        }
        let mut t = Vec::new();
        numeric_text(&b, &mut t).unwrap();
        String::from_utf8(t).unwrap()
    }

    #[test]
    fn numeric_binary_to_text() {
        assert_eq!(num(0, 0, 0, 0, &[]), "0");
        assert_eq!(num(0, 0, 0, 2, &[]), "0.00");
        assert_eq!(num(1, 0, 0, 2, &[12]), "12.00");
        assert_eq!(num(2, 0, 0, 2, &[12, 3400]), "12.34");
        assert_eq!(num(2, 1, 0x4000, 0, &[1, 0]), "-10000");
        assert_eq!(num(1, -1, 0, 3, &[50]), "0.005");
        assert_eq!(num(1, 1, 0, 0, &[5]), "50000");
        assert_eq!(num(0, 0, 0xC000, 0, &[]), "NaN");
    }

    #[test]
    fn timestamps_binary_to_text() {
        let t = |us: i64, tz: bool| {
            let mut v = Vec::new();
            timestamp_text(us, tz, &mut v);
            String::from_utf8(v).unwrap()
        };
        assert_eq!(t(0, true), "2000-01-01 00:00:00+00");
        assert_eq!(t(-1, false), "1999-12-31 23:59:59.999999");
        assert_eq!(t(1_500_000, true), "2000-01-01 00:00:01.5+00");
        assert_eq!(t(-63_082_281_600_000_000, true), "0001-01-01 00:00:00+00");
        assert_eq!(
            t(-63_113_904_000_000_000, true),
            "0001-01-01 00:00:00+00 BC"
        );
        assert_eq!(t(i64::MAX, true), "infinity");
        assert_eq!(t(848_966_400_000_000, true), "2026-11-26 00:00:00+00");
    }
}
