//! One column value, as the type's text output, to JSON text equal to what the
//! server's `to_jsonb()` gives for the same value.
//!
//! The text is what pgoutput sends with the walsender's session settings
//! (`TimeZone=UTC`, `DateStyle=ISO`, `IntervalStyle=postgres`,
//! `extra_float_digits=3`, `bytea_output=hex`). The output is byte for byte
//! `to_jsonb(value)::text`, so containers use jsonb's spacing (`[1, 2]`,
//! `{"a": 1}`) and jsonb's key order. The rules, with the server behaviour they
//! were checked against, are in `proto-notes/values.md`.
//!
//! Nothing here panics on any input: malformed text gives a [`ValueError`] and
//! leaves `out` as it was, so the caller can fall back to
//! [`write_json_string`] of the raw text.

use super::types::{Composite, TypeKind, TypeRegistry};
use crate::json_write::{escape_into, write_json_string};
use std::borrow::Cow;

/// Nesting limit across arrays, composites, domains and json containers.
pub const MAX_DEPTH: u32 = 100;

/// Most dimensions an array can have (the server's `MAXDIM`).
const MAX_ARRAY_DIMS: u32 = 6;

/// Largest scale (digits after the point) a numeric can have: jsonb numbers
/// are numerics, so anything beyond is an error on the server too.
const NUMERIC_DSCALE_MAX: i64 = 0x3FFF;
/// Most digits before the point of a numeric (weight 32767 base-10000 digits).
const NUMERIC_INT_DIGITS_MAX: i64 = 4 * 32768;
/// `numeric_in` rejects exponents from `INT_MAX / 2` on.
const EXPONENT_LIMIT: i64 = (i32::MAX / 2) as i64;

/// Why a value's text could not be rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("value text is not valid UTF-8")]
    InvalidUtf8,
    #[error("malformed {kind} text: {reason}")]
    Malformed {
        kind: &'static str,
        reason: &'static str,
    },
    #[error("number is outside the range of numeric, which jsonb numbers use")]
    NumericOverflow,
    #[error("json string contains \\u0000 or an unpaired surrogate, which jsonb rejects")]
    UnsupportedEscape,
    #[error("value nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

fn malformed(kind: &'static str, reason: &'static str) -> ValueError {
    ValueError::Malformed { kind, reason }
}

/// Appends the JSON for the value of type `oid` whose text output is `text`.
///
/// Unknown OIDs render as a string of the text. On error `out` is truncated
/// back to its length on entry.
pub fn render(
    reg: &TypeRegistry,
    oid: u32,
    text: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ValueError> {
    let start = out.len();
    let res = render_at(reg, oid, text, out, 0);
    if res.is_err() {
        out.truncate(start);
    }
    res
}

/// [`render`], or, for a text that is not what the type's output function
/// produces, the text as a JSON string: the value is kept, never lost.
pub fn render_or_string(reg: &TypeRegistry, oid: u32, text: &[u8], out: &mut Vec<u8>) {
    if render(reg, oid, text, out).is_err() {
        write_json_string(text, out);
    }
}

fn render_at(
    reg: &TypeRegistry,
    oid: u32,
    text: &[u8],
    out: &mut Vec<u8>,
    depth: u32,
) -> Result<(), ValueError> {
    if depth > MAX_DEPTH {
        return Err(ValueError::TooDeep);
    }
    match reg.kind(oid) {
        None
        | Some(TypeKind::String)
        | Some(TypeKind::Date)
        | Some(TypeKind::Time)
        | Some(TypeKind::TimeTz)
        | Some(TypeKind::Bytea) => write_checked_string(text, out),
        Some(TypeKind::Bool) => {
            match text {
                b"t" => out.extend_from_slice(b"true"),
                b"f" => out.extend_from_slice(b"false"),
                _ => return Err(malformed("bool", "expected t or f")),
            }
            Ok(())
        }
        Some(TypeKind::Int) | Some(TypeKind::Float) | Some(TypeKind::Numeric) => {
            write_number(text, out)
        }
        Some(TypeKind::Json) => json::normalize(text, out),
        Some(TypeKind::Jsonb) => {
            std::str::from_utf8(text).map_err(|_| ValueError::InvalidUtf8)?;
            json::validate(text)?;
            out.extend_from_slice(text);
            Ok(())
        }
        Some(TypeKind::Timestamp) => write_timestamp(text, false, out),
        Some(TypeKind::TimestampTz) => write_timestamp(text, true, out),
        Some(TypeKind::Array { elem, delim }) => {
            render_array(reg, *elem, *delim, text, out, depth + 1)
        }
        Some(TypeKind::Vector { elem }) => render_vector(reg, *elem, text, out, depth + 1),
        Some(TypeKind::Composite(c)) => render_record(reg, c, text, out, depth + 1),
        Some(TypeKind::Domain { base }) => render_at(reg, *base, text, out, depth + 1),
    }
}

// ---------------------------------------------------------------------------
// Strings

fn write_checked_string(s: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
    std::str::from_utf8(s).map_err(|_| ValueError::InvalidUtf8)?;
    out.push(b'"');
    escape_into(s, out);
    out.push(b'"');
    Ok(())
}

// ---------------------------------------------------------------------------
// Numbers

/// A number in JSON syntax, split up.
struct NumberParts<'a> {
    negative: bool,
    int: &'a [u8],
    frac: &'a [u8],
    /// The exponent, saturated well beyond any accepted value.
    exp: Option<i64>,
}

/// Parses exactly `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn parse_number(s: &[u8]) -> Option<NumberParts<'_>> {
    let mut i = 0;
    let negative = s.first() == Some(&b'-');
    if negative {
        i = 1;
    }
    let int_start = i;
    while i < s.len() && s[i].is_ascii_digit() {
        i += 1;
    }
    let int = &s[int_start..i];
    if int.is_empty() || (int.len() > 1 && int[0] == b'0') {
        return None;
    }
    let mut frac: &[u8] = &[];
    if i < s.len() && s[i] == b'.' {
        let f = i + 1;
        i = f;
        while i < s.len() && s[i].is_ascii_digit() {
            i += 1;
        }
        frac = &s[f..i];
        if frac.is_empty() {
            return None;
        }
    }
    let mut exp = None;
    if i < s.len() && (s[i] == b'e' || s[i] == b'E') {
        i += 1;
        let mut neg = false;
        if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
            neg = s[i] == b'-';
            i += 1;
        }
        let d = i;
        let mut e: i64 = 0;
        while i < s.len() && s[i].is_ascii_digit() {
            e = (e * 10 + i64::from(s[i] - b'0')).min(1 << 40);
            i += 1;
        }
        if i == d {
            return None;
        }
        exp = Some(if neg { -e } else { e });
    }
    (i == s.len()).then_some(NumberParts {
        negative,
        int,
        frac,
        exp,
    })
}

/// Appends a number the way jsonb holds it: the text `numeric_out` gives for
/// `numeric_in` of it. Without an exponent that is the text itself (except
/// that a negative zero loses its sign); with one, the digits are written out
/// in full with scale `max(0, digits after the point - exponent)`.
fn write_number_parts(
    n: &NumberParts<'_>,
    text: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ValueError> {
    let all_zero = n.int.iter().chain(n.frac).all(|&d| d == b'0');
    let exp = match n.exp {
        None if !(n.negative && all_zero) => {
            out.extend_from_slice(text);
            return Ok(());
        }
        None => 0,
        Some(e) => e,
    };
    if !(-EXPONENT_LIMIT..EXPONENT_LIMIT).contains(&exp) {
        return Err(ValueError::NumericOverflow);
    }
    // Digit string D = int ++ frac, point after `point` digits of D.
    let digits = n.int.len() as i64 + n.frac.len() as i64;
    let digit = |i: i64| -> u8 {
        if i < 0 || i >= digits {
            b'0'
        } else if i < n.int.len() as i64 {
            n.int[i as usize]
        } else {
            n.frac[(i - n.int.len() as i64) as usize]
        }
    };
    let point = n.int.len() as i64 + exp;
    let scale = (n.frac.len() as i64 - exp).max(0);
    if scale > NUMERIC_DSCALE_MAX {
        return Err(ValueError::NumericOverflow);
    }
    let first_nonzero = (0..digits).find(|&i| digit(i) != b'0').unwrap_or(digits);
    if !all_zero && point - first_nonzero > NUMERIC_INT_DIGITS_MAX {
        return Err(ValueError::NumericOverflow);
    }
    if n.negative && !all_zero {
        out.push(b'-');
    }
    if all_zero || point <= first_nonzero {
        out.push(b'0');
    } else {
        out.extend((first_nonzero..point).map(digit));
    }
    if scale > 0 {
        out.push(b'.');
        out.extend((point..point + scale).map(digit));
    }
    Ok(())
}

/// int2/4/8, float4/8 and numeric text → jsonb number (or string for the
/// special values, which are not JSON numbers).
fn write_number(text: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
    if let b"NaN" | b"Infinity" | b"-Infinity" = text {
        out.push(b'"');
        out.extend_from_slice(text);
        out.push(b'"');
        return Ok(());
    }
    let parts = parse_number(text).ok_or(malformed("number", "not a decimal number"))?;
    write_number_parts(&parts, text, out)
}

// ---------------------------------------------------------------------------
// Timestamps

fn is_digits(s: &[u8], also: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|b| b.is_ascii_digit() || also.contains(b))
}

/// ISO `YYYY-MM-DD HH:MM:SS[.f][+HH[:MM[:SS]]][ BC]` → the XSD form `to_jsonb`
/// writes: `T` between date and time, offset always with minutes (and seconds
/// when not zero).
fn write_timestamp(text: &[u8], with_tz: bool, out: &mut Vec<u8>) -> Result<(), ValueError> {
    const KIND: &str = "timestamp";
    if text == b"infinity" || text == b"-infinity" {
        out.push(b'"');
        out.extend_from_slice(text);
        out.push(b'"');
        return Ok(());
    }
    let sp = text
        .iter()
        .position(|&b| b == b' ')
        .ok_or(malformed(KIND, "no space between date and time"))?;
    let date = &text[..sp];
    let mut rest = &text[sp + 1..];
    let bc = rest.ends_with(b" BC");
    if bc {
        rest = &rest[..rest.len() - 3];
    }
    let (time, offset) = if with_tz {
        let k = rest
            .iter()
            .rposition(|&b| b == b'+' || b == b'-')
            .ok_or(malformed(KIND, "no UTC offset"))?;
        (&rest[..k], Some(&rest[k..]))
    } else {
        (rest, None)
    };
    if !is_digits(date, b"-") || !is_digits(time, b":.") {
        return Err(malformed(KIND, "unexpected characters"));
    }
    out.push(b'"');
    out.extend_from_slice(date);
    out.push(b'T');
    out.extend_from_slice(time);
    if let Some(off) = offset {
        let mut parts = off[1..].split(|&b| b == b':');
        let hh = parts.next().unwrap_or_default();
        let mm = parts.next().unwrap_or(b"00");
        let ss = parts.next();
        let ok = |p: &[u8]| p.len() == 2 && p.iter().all(u8::is_ascii_digit);
        if !ok(hh) || !ok(mm) || !ss.is_none_or(ok) || parts.next().is_some() {
            return Err(malformed(KIND, "bad UTC offset"));
        }
        out.push(off[0]);
        out.extend_from_slice(hh);
        out.push(b':');
        out.extend_from_slice(mm);
        if let Some(ss) = ss.filter(|s| *s != b"00") {
            out.push(b':');
            out.extend_from_slice(ss);
        }
    }
    if bc {
        out.extend_from_slice(b" BC");
    }
    out.push(b'"');
    Ok(())
}

// ---------------------------------------------------------------------------
// Arrays and composites

/// Whitespace as `array_in` skips it.
fn is_array_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c')
}

/// Removes one level of backslash escaping (`\x` → `x`) into `buf`.
fn unescape_backslashes(s: &[u8], buf: &mut Vec<u8>) {
    buf.clear();
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' && i + 1 < s.len() {
            i += 1;
        }
        buf.push(s[i]);
        i += 1;
    }
}

struct ArrayParser<'a> {
    s: &'a [u8],
    i: usize,
    delim: u8,
    /// Unescaped element text, reused across elements.
    scratch: Vec<u8>,
}

const ARRAY: &str = "array";

impl<'a> ArrayParser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_space(&mut self) {
        while self.i < self.s.len() && is_array_space(self.s[self.i]) {
            self.i += 1;
        }
    }

    /// Skips an `[lo:hi][lo:hi]=` dimension decoration (to_jsonb ignores the
    /// bounds).
    fn skip_dimensions(&mut self) -> Result<(), ValueError> {
        self.skip_space();
        if self.peek() != Some(b'[') {
            return Ok(());
        }
        while self.peek() == Some(b'[') {
            self.i += 1;
            let start = self.i;
            while let Some(b) = self.peek() {
                if b.is_ascii_digit() || b == b':' || b == b'-' || b == b'+' {
                    self.i += 1;
                } else {
                    break;
                }
            }
            if self.i == start || self.peek() != Some(b']') {
                return Err(malformed(ARRAY, "bad dimension decoration"));
            }
            self.i += 1;
            self.skip_space();
        }
        if self.peek() != Some(b'=') {
            return Err(malformed(ARRAY, "dimension decoration without ="));
        }
        self.i += 1;
        self.skip_space();
        Ok(())
    }

    /// Reads one element that is not a sub-array. Returns `None` for NULL,
    /// otherwise the raw text and whether it holds backslash escapes.
    fn element(&mut self) -> Result<Option<(&'a [u8], bool)>, ValueError> {
        let s = self.s;
        let mut escaped = false;
        if self.peek() == Some(b'"') {
            self.i += 1;
            let start = self.i;
            loop {
                match s.get(self.i) {
                    None => return Err(malformed(ARRAY, "unterminated quoted element")),
                    Some(b'"') => break,
                    Some(b'\\') => {
                        escaped = true;
                        if self.i + 1 >= s.len() {
                            return Err(malformed(ARRAY, "unterminated quoted element"));
                        }
                        self.i += 2;
                    }
                    Some(_) => self.i += 1,
                }
            }
            let text = &s[start..self.i];
            self.i += 1;
            return Ok(Some((text, escaped)));
        }
        let start = self.i;
        let mut end = start; // end of the text without trailing whitespace
        loop {
            match s.get(self.i) {
                None => return Err(malformed(ARRAY, "unterminated array")),
                Some(&b) if b == self.delim || b == b'}' => break,
                Some(b'"') | Some(b'{') => {
                    return Err(malformed(ARRAY, "unexpected quote or brace in element"))
                }
                Some(b'\\') => {
                    escaped = true;
                    if self.i + 1 >= s.len() {
                        return Err(malformed(ARRAY, "backslash at end"));
                    }
                    self.i += 2;
                    end = self.i;
                }
                Some(&b) => {
                    self.i += 1;
                    if !is_array_space(b) {
                        end = self.i;
                    }
                }
            }
        }
        let text = &s[start..end];
        if text.is_empty() {
            return Err(malformed(ARRAY, "empty unquoted element"));
        }
        if !escaped && text.eq_ignore_ascii_case(b"NULL") {
            return Ok(None);
        }
        Ok(Some((text, escaped)))
    }

    /// One `{…}` level, rendered as `[…]`.
    fn level(
        &mut self,
        reg: &TypeRegistry,
        elem: u32,
        out: &mut Vec<u8>,
        depth: u32,
        dims: u32,
    ) -> Result<(), ValueError> {
        if dims > MAX_ARRAY_DIMS {
            return Err(malformed(ARRAY, "more than 6 dimensions"));
        }
        self.skip_space();
        if self.peek() != Some(b'{') {
            return Err(malformed(ARRAY, "expected {"));
        }
        self.i += 1;
        out.push(b'[');
        self.skip_space();
        if self.peek() == Some(b'}') {
            self.i += 1;
            out.push(b']');
            return Ok(());
        }
        let mut first = true;
        loop {
            if !first {
                out.extend_from_slice(b", ");
            }
            first = false;
            self.skip_space();
            if self.peek() == Some(b'{') {
                self.level(reg, elem, out, depth, dims + 1)?;
            } else {
                match self.element()? {
                    None => out.extend_from_slice(b"null"),
                    Some((text, false)) => render_at(reg, elem, text, out, depth + 1)?,
                    Some((text, true)) => {
                        let mut buf = std::mem::take(&mut self.scratch);
                        unescape_backslashes(text, &mut buf);
                        let r = render_at(reg, elem, &buf, out, depth + 1);
                        self.scratch = buf;
                        r?;
                    }
                }
            }
            self.skip_space();
            match self.peek() {
                Some(b'}') => {
                    self.i += 1;
                    break;
                }
                Some(b) if b == self.delim => self.i += 1,
                _ => return Err(malformed(ARRAY, "expected delimiter or }")),
            }
        }
        out.push(b']');
        Ok(())
    }
}

/// `{…}` array literal (optionally `[lo:hi]=`-decorated, nested for several
/// dimensions) → JSON array of elements rendered by the element type.
fn render_array(
    reg: &TypeRegistry,
    elem: u32,
    delim: u8,
    text: &[u8],
    out: &mut Vec<u8>,
    depth: u32,
) -> Result<(), ValueError> {
    let mut p = ArrayParser {
        s: text,
        i: 0,
        delim,
        scratch: Vec::new(),
    };
    p.skip_dimensions()?;
    p.level(reg, elem, out, depth, 1)?;
    p.skip_space();
    if p.i != text.len() {
        return Err(malformed(ARRAY, "text after the closing brace"));
    }
    Ok(())
}

/// int2vector / oidvector: `1 2 3` → JSON array.
fn render_vector(
    reg: &TypeRegistry,
    elem: u32,
    text: &[u8],
    out: &mut Vec<u8>,
    depth: u32,
) -> Result<(), ValueError> {
    out.push(b'[');
    let mut first = true;
    for item in text.split(|&b| b == b' ').filter(|s| !s.is_empty()) {
        if !first {
            out.extend_from_slice(b", ");
        }
        first = false;
        render_at(reg, elem, item, out, depth)?;
    }
    out.push(b']');
    Ok(())
}

/// Where a composite field's text is.
#[derive(Clone, Copy)]
enum Field {
    Null,
    /// A range of the literal itself (no quoting or escapes).
    Raw(usize, usize),
    /// A range of the unescaped-text buffer.
    Unescaped(usize, usize),
}

const RECORD: &str = "record";

/// `(a,"b c",)` record literal → object, keys in jsonb order, each field
/// rendered by its type. Parsing follows `record_in`: an empty unquoted field is
/// NULL, `""` is an empty string; inside or outside quotes `\x` is `x`, inside
/// quotes `""` is `"`.
fn render_record(
    reg: &TypeRegistry,
    ty: &Composite,
    text: &[u8],
    out: &mut Vec<u8>,
    depth: u32,
) -> Result<(), ValueError> {
    let n = ty.fields.len();
    let mut inline = [Field::Null; 16];
    let mut heap = Vec::new();
    let fields: &mut [Field] = if n <= inline.len() {
        &mut inline[..n]
    } else {
        heap.resize(n, Field::Null);
        &mut heap
    };
    let mut buf: Vec<u8> = Vec::new();

    let s = text;
    let mut i = 0;
    while i < s.len() && is_array_space(s[i]) {
        i += 1;
    }
    if s.get(i) != Some(&b'(') {
        return Err(malformed(RECORD, "expected ("));
    }
    i += 1;
    if n == 0 {
        if s.get(i) != Some(&b')') {
            return Err(malformed(
                RECORD,
                "fields in a composite without attributes",
            ));
        }
        i += 1;
    }
    for (k, field) in fields.iter_mut().enumerate() {
        match s.get(i) {
            None => return Err(malformed(RECORD, "unterminated record")),
            Some(b',') | Some(b')') => *field = Field::Null,
            Some(_) => {
                // Fast path: no quoting or escapes before the field ends.
                let start = i;
                let mut j = i;
                while j < s.len() && !matches!(s[j], b',' | b')' | b'"' | b'\\') {
                    j += 1;
                }
                if j < s.len() && matches!(s[j], b',' | b')') {
                    *field = Field::Raw(start, j);
                    i = j;
                } else {
                    let from = buf.len();
                    let mut in_quotes = false;
                    loop {
                        let Some(&c) = s.get(i) else {
                            return Err(malformed(RECORD, "unterminated field"));
                        };
                        if !in_quotes && (c == b',' || c == b')') {
                            break;
                        }
                        i += 1;
                        match c {
                            b'\\' => {
                                let Some(&e) = s.get(i) else {
                                    return Err(malformed(RECORD, "backslash at end"));
                                };
                                buf.push(e);
                                i += 1;
                            }
                            b'"' if !in_quotes => in_quotes = true,
                            b'"' if s.get(i) == Some(&b'"') => {
                                buf.push(b'"');
                                i += 1;
                            }
                            b'"' => in_quotes = false,
                            _ => buf.push(c),
                        }
                    }
                    *field = Field::Unescaped(from, buf.len());
                }
            }
        }
        // s[i] is ',' or ')' here (or the text ended).
        let want = if k + 1 == n { b')' } else { b',' };
        if s.get(i) != Some(&want) {
            return Err(malformed(
                RECORD,
                "field count differs from the type's attributes",
            ));
        }
        i += 1;
    }
    while i < s.len() && is_array_space(s[i]) {
        i += 1;
    }
    if i != s.len() {
        return Err(malformed(RECORD, "text after the closing parenthesis"));
    }

    out.push(b'{');
    for (j, &k) in ty.key_order.iter().enumerate() {
        let (name, oid) = &ty.fields[k];
        if j > 0 {
            out.extend_from_slice(b", ");
        }
        write_json_string(name.as_bytes(), out);
        out.extend_from_slice(b": ");
        match fields.get(k).copied().unwrap_or(Field::Null) {
            Field::Null => out.extend_from_slice(b"null"),
            Field::Raw(a, b) => render_at(reg, *oid, &s[a..b], out, depth)?,
            Field::Unescaped(a, b) => render_at(reg, *oid, &buf[a..b], out, depth)?,
        }
    }
    out.push(b'}');
    Ok(())
}

// ---------------------------------------------------------------------------
// json / jsonb

mod json;

#[cfg(test)]
mod tests {
    use super::*;

    const BOOL: u32 = 16;
    const BYTEA: u32 = 17;
    const INT4: u32 = 23;
    const TEXT: u32 = 25;
    const OID: u32 = 26;
    const JSON: u32 = 114;
    const FLOAT4: u32 = 700;
    const FLOAT8: u32 = 701;
    const NUMERIC: u32 = 1700;
    const TIMESTAMP: u32 = 1114;
    const TIMESTAMPTZ: u32 = 1184;
    const TIMETZ: u32 = 1266;
    const JSONB: u32 = 3802;
    const INT4_ARR: u32 = 1007;
    const TEXT_ARR: u32 = 1009;
    const BOX_ARR: u32 = 1020;
    const JSON_ARR: u32 = 199;
    const INT2VECTOR: u32 = 22;
    const OIDVECTOR: u32 = 30;
    // User types registered by `registry()`.
    const INNER: u32 = 20000;
    const PAIR: u32 = 20001;
    const PAIR_ARR: u32 = 20002;
    const POSINT: u32 = 20003;
    const POSINT_ARR: u32 = 20004;
    const EMPTY: u32 = 20005;
    const LOOP: u32 = 20006;

    fn registry() -> TypeRegistry {
        let mut reg = TypeRegistry::builtin();
        reg.insert(
            INNER,
            TypeKind::Composite(Composite::new(vec![("n".into(), INT4), ("t".into(), TEXT)])),
        );
        reg.insert(
            PAIR,
            TypeKind::Composite(Composite::new(vec![
                ("label".into(), TEXT),
                ("tags".into(), TEXT_ARR),
                ("inner".into(), INNER),
                ("j".into(), JSON),
                ("d".into(), POSINT),
            ])),
        );
        reg.insert(
            PAIR_ARR,
            TypeKind::Array {
                elem: PAIR,
                delim: b',',
            },
        );
        reg.insert(POSINT, TypeKind::Domain { base: INT4 });
        reg.insert(
            POSINT_ARR,
            TypeKind::Array {
                elem: POSINT,
                delim: b',',
            },
        );
        reg.insert(EMPTY, TypeKind::Composite(Composite::new(vec![])));
        reg.insert(LOOP, TypeKind::Domain { base: LOOP });
        reg
    }

    fn r(oid: u32, text: &str) -> Result<String, ValueError> {
        r_bytes(oid, text.as_bytes())
    }

    fn r_bytes(oid: u32, text: &[u8]) -> Result<String, ValueError> {
        let reg = registry();
        let mut out = b"prefix".to_vec();
        let res = render(&reg, oid, text, &mut out);
        match res {
            Ok(()) => {
                let s = String::from_utf8(out[6..].to_vec()).expect("output is UTF-8");
                serde_json::from_str::<serde_json::Value>(&s)
                    .unwrap_or_else(|e| panic!("invalid JSON {s:?}: {e}"));
                Ok(s)
            }
            Err(e) => {
                assert_eq!(out, b"prefix", "output not restored after error");
                Err(e)
            }
        }
    }

    fn ok(oid: u32, text: &str) -> String {
        r(oid, text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn strings_escape_like_escape_json() {
        assert_eq!(
            ok(TEXT, "a\u{1}\u{1f}\u{7f}/\\\"\n\t\r\u{c}\u{8}é😀"),
            "\"a\\u0001\\u001f\u{7f}/\\\\\\\"\\n\\t\\r\\f\\bé😀\""
        );
        assert_eq!(ok(OID, "12"), "\"12\"");
        assert_eq!(ok(BYTEA, "\\x00ff"), "\"\\\\x00ff\"");
        assert_eq!(ok(TIMETZ, "12:34:56-08"), "\"12:34:56-08\"");
        assert_eq!(ok(99999, "unknown type"), "\"unknown type\"");
        assert_eq!(r_bytes(TEXT, b"a\xffb"), Err(ValueError::InvalidUtf8));
    }

    #[test]
    fn bools() {
        assert_eq!(ok(BOOL, "t"), "true");
        assert_eq!(ok(BOOL, "f"), "false");
        assert!(r(BOOL, "true").is_err());
    }

    #[test]
    fn float_expansion_matches_numeric_in() {
        let cases = [
            ("0", "0"),
            ("-0", "0"),
            ("123.456", "123.456"),
            ("-1.5", "-1.5"),
            ("1e+100", &format!("1{}", "0".repeat(100))),
            ("1.5e-07", "0.00000015"),
            ("-1.5e-07", "-0.00000015"),
            ("1e+30", "1000000000000000000000000000000"),
            ("3.4028235e+38", "340282350000000000000000000000000000000"),
            (
                "1.7976931348623157e+308",
                &format!("17976931348623157{}", "0".repeat(292)),
            ),
            ("5e-324", &format!("0.{}5", "0".repeat(323))),
            ("1.25e+01", "12.5"),
            ("NaN", "\"NaN\""),
            ("Infinity", "\"Infinity\""),
            ("-Infinity", "\"-Infinity\""),
        ];
        for (text, want) in cases {
            assert_eq!(ok(FLOAT8, text), want, "{text}");
            assert_eq!(ok(FLOAT4, text), want, "{text}");
        }
        assert!(r(FLOAT8, "1e").is_err());
        assert!(r(FLOAT8, "inf").is_err());
        assert!(r(FLOAT8, "").is_err());
    }

    #[test]
    fn numerics_keep_their_digits() {
        assert_eq!(ok(NUMERIC, "1.50"), "1.50");
        assert_eq!(ok(NUMERIC, "-0.000100"), "-0.000100");
        assert_eq!(
            ok(NUMERIC, "123456789012345678901234567890.123456789"),
            "123456789012345678901234567890.123456789"
        );
        assert_eq!(ok(NUMERIC, "NaN"), "\"NaN\"");
        assert_eq!(ok(NUMERIC, "-Infinity"), "\"-Infinity\"");
        assert_eq!(ok(INT4, "-2147483648"), "-2147483648");
        assert!(r(INT4, "1 ").is_err());
        assert!(r(INT4, "01").is_err());
    }

    #[test]
    fn numeric_range_limits() {
        // Checked against the server: `to_jsonb('…'::json)`.
        assert_eq!(ok(JSON, "0e-16383").len(), 16385);
        assert_eq!(r(JSON, "0e-16384"), Err(ValueError::NumericOverflow));
        assert_eq!(r(JSON, "1.5e-16383"), Err(ValueError::NumericOverflow));
        assert_eq!(ok(JSON, "1e131071").len(), 131072);
        assert_eq!(r(JSON, "1e131072"), Err(ValueError::NumericOverflow));
        assert_eq!(ok(JSON, "0e200000"), "0");
        assert_eq!(r(JSON, "1e2147483648"), Err(ValueError::NumericOverflow));
        assert_eq!(ok(JSON, "0.000e2"), "0.0");
        assert_eq!(ok(JSON, "-0e5"), "0");
        assert_eq!(
            ok(JSON, "123456789012345678901234567890.5e-40"),
            "0.00000000001234567890123456789012345678905"
        );
    }

    #[test]
    fn timestamps_use_xsd_form() {
        assert_eq!(
            ok(TIMESTAMP, "2020-01-01 12:00:00.123"),
            "\"2020-01-01T12:00:00.123\""
        );
        assert_eq!(
            ok(TIMESTAMP, "0044-03-15 12:00:00 BC"),
            "\"0044-03-15T12:00:00 BC\""
        );
        assert_eq!(ok(TIMESTAMP, "infinity"), "\"infinity\"");
        assert_eq!(ok(TIMESTAMP, "-infinity"), "\"-infinity\"");
        assert_eq!(
            ok(TIMESTAMP, "10000-01-01 00:00:00"),
            "\"10000-01-01T00:00:00\""
        );
        assert_eq!(
            ok(TIMESTAMPTZ, "2020-01-01 12:00:00+00"),
            "\"2020-01-01T12:00:00+00:00\""
        );
        assert_eq!(
            ok(TIMESTAMPTZ, "0044-03-15 12:00:00.5+00 BC"),
            "\"0044-03-15T12:00:00.5+00:00 BC\""
        );
        assert_eq!(
            ok(TIMESTAMPTZ, "2020-01-01 12:00:00-05:30"),
            "\"2020-01-01T12:00:00-05:30\""
        );
        assert_eq!(
            ok(TIMESTAMPTZ, "1900-01-01 12:00:00+00:53:28"),
            "\"1900-01-01T12:00:00+00:53:28\""
        );
        assert!(r(TIMESTAMPTZ, "2020-01-01 12:00:00").is_err());
        assert!(r(TIMESTAMP, "2020-01-01T12:00:00").is_err());
        assert!(r(TIMESTAMPTZ, "2020-01-01 12:00:00+0").is_err());
    }

    #[test]
    fn arrays() {
        assert_eq!(ok(INT4_ARR, "{}"), "[]");
        assert_eq!(ok(INT4_ARR, "{1,2,NULL}"), "[1, 2, null]");
        assert_eq!(ok(INT4_ARR, "{{1,2},{3,NULL}}"), "[[1, 2], [3, null]]");
        assert_eq!(ok(INT4_ARR, "[2:3]={1,2}"), "[1, 2]");
        assert_eq!(ok(INT4_ARR, "[0:1][-2:-2]={{1},{2}}"), "[[1], [2]]");
        assert_eq!(ok(INT4_ARR, " { 1 , 2 } "), "[1, 2]");
        assert_eq!(
            ok(
                TEXT_ARR,
                r#"{"a b","NULL",NULL,null,"","q\"uote","back\\slash","{br,ace}",é}"#
            ),
            r#"["a b", "NULL", null, null, "", "q\"uote", "back\\slash", "{br,ace}", "é"]"#
        );
        assert_eq!(ok(TEXT_ARR, r#"{a\,b,c\ }"#), r#"["a,b", "c "]"#);
        assert_eq!(
            ok(BOX_ARR, "{(1,2),(0,0);(3,3),(2,2)}"),
            r#"["(1,2),(0,0)", "(3,3),(2,2)"]"#
        );
        assert_eq!(
            ok(JSON_ARR, r#"{"{\"b\":1,\"a\":[1e2]}",NULL,"\"s\""}"#),
            r#"[{"a": [100], "b": 1}, null, "s"]"#
        );
        assert_eq!(ok(POSINT_ARR, "{1,2}"), "[1, 2]");
        for bad in [
            "", "{", "{1", "{1,}", "{,1}", "{1}x", "{\"a}", "[1:2]{1}", "{1\"}", "{{1}", "1",
        ] {
            assert!(r(INT4_ARR, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn vectors() {
        assert_eq!(ok(INT2VECTOR, "1 2 3"), "[1, 2, 3]");
        assert_eq!(ok(INT2VECTOR, ""), "[]");
        assert_eq!(ok(OIDVECTOR, "1 2"), r#"["1", "2"]"#);
    }

    #[test]
    fn composites() {
        assert_eq!(ok(INNER, "(1,abc)"), r#"{"n": 1, "t": "abc"}"#);
        assert_eq!(ok(INNER, "(,)"), r#"{"n": null, "t": null}"#);
        assert_eq!(ok(INNER, r#"(,"")"#), r#"{"n": null, "t": ""}"#);
        assert_eq!(
            ok(INNER, r#"(1,"a ""q"" \\ b,c()")"#),
            r#"{"n": 1, "t": "a \"q\" \\ b,c()"}"#
        );
        assert_eq!(
            ok(INNER, r#"(1,a"b c"d\,e)"#),
            r#"{"n": 1, "t": "ab cd,e"}"#
        );
        // Keys in jsonb order: d, j, tags, inner, label.
        assert_eq!(
            ok(
                PAIR,
                r#"("x y","{a,""b c"",NULL}","(2,""z"")","{""k"": [1.0e1]}",7)"#
            ),
            r#"{"d": 7, "j": {"k": [10]}, "tags": ["a", "b c", null], "inner": {"n": 2, "t": "z"}, "label": "x y"}"#
        );
        assert_eq!(
            ok(PAIR_ARR, r#"{"(a,{},\"(,)\",null,1)",NULL}"#),
            r#"[{"d": 1, "j": null, "tags": [], "inner": {"n": null, "t": null}, "label": "a"}, null]"#
        );
        assert_eq!(ok(EMPTY, "()"), "{}");
        for bad in [
            "", "(", "(1)", "(1,a,b)", "(1,a", "(1,\"a)", "1,a", "(1,a)x", "(1,a\\",
        ] {
            assert!(r(INNER, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_becomes_jsonb() {
        assert_eq!(
            ok(
                JSON,
                r#" {"b":1, "a": [1e2, -0, -0.0, 0.10, 1E+2, 0.001e2, 12.5e-1], "aa":null, "a":{"x":true}} "#
            ),
            r#"{"a": {"x": true}, "b": 1, "aa": null}"#
        );
        assert_eq!(
            ok(JSON, r#"["\u00e9\/\u001f\b\u007f\ud83d\ude00", {}, [], {"":1, "bb":2, "a":3, "é":4, "z":5}]"#),
            "[\"é/\\u001f\\b\u{7f}😀\", {}, [], {\"\": 1, \"a\": 3, \"z\": 5, \"bb\": 2, \"é\": 4}]"
        );
        assert_eq!(ok(JSON, "\"x\""), "\"x\"");
        assert_eq!(ok(JSON, "null"), "null");
        assert_eq!(r(JSON, r#""\u0000""#), Err(ValueError::UnsupportedEscape));
        assert_eq!(r(JSON, r#""\ud83d""#), Err(ValueError::UnsupportedEscape));
        assert_eq!(r(JSON, r#""\ude00""#), Err(ValueError::UnsupportedEscape));
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\"}",
            "01",
            "1.",
            "\"\\x\"",
            "tru",
            "[1] 2",
            "\"a\u{1}\"",
        ] {
            assert!(r(JSON, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn jsonb_is_checked_and_copied() {
        let t = r#"{"a": [1, 2.50, "x\"y"], "b": {}}"#;
        assert_eq!(ok(JSONB, t), t);
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\": 1,}",
            "[1] 2",
            "{\"a\" 1}",
            "[}",
            "{]",
        ] {
            assert!(r(JSONB, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deep_nesting_never_overflows_the_stack() {
        // json and jsonb are handled iteratively: any depth is fine.
        let deep = format!("{}1{}", "[{\"k\": ".repeat(5000), "}]".repeat(5000));
        let reg = registry();
        for oid in [JSON, JSONB] {
            let mut out = Vec::new();
            render(&reg, oid, deep.as_bytes(), &mut out).unwrap();
            assert_eq!(out, deep.as_bytes());
        }
        // Mismatched brackets are caught at any depth (here at 10000, and near
        // the inline/heap boundary of the validator's stack).
        for at in [0, 4872, 4936, 4999] {
            let mut bad = deep.clone().into_bytes();
            let k = deep.len() - 2 * (5000 - at);
            assert_eq!(&bad[k..k + 2], b"}]");
            bad[k] = b']';
            assert!(r_bytes(JSONB, &bad).is_err(), "{at}");
            assert!(r_bytes(JSON, &bad).is_err(), "{at}");
        }
        let deep_arr = format!("{}{}", "{".repeat(5000), "}".repeat(5000));
        assert!(r(INT4_ARR, &deep_arr).is_err());
        assert_eq!(ok(INT4_ARR, "{{{{{{1}}}}}}"), "[[[[[[1]]]]]]");
        assert!(r(INT4_ARR, "{{{{{{{1}}}}}}}").is_err());
        assert_eq!(r(LOOP, "1"), Err(ValueError::TooDeep));
    }

    /// Deterministic xorshift64*.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_mutations_never_panic() {
        let corpus: &[(u32, &str)] = &[
            (INT4_ARR, "[2:3]={{1,2},{3,NULL}}"),
            (TEXT_ARR, r#"{"a b","q\"uote",NULL,"back\\slash",plain}"#),
            (BOX_ARR, "{(1,2),(0,0);(3,3),(2,2)}"),
            (JSON_ARR, r#"{"{\"b\":1,\"a\":[1e2]}",NULL,"\"s\\u00e9\""}"#),
            (
                PAIR,
                r#"("x y","{a,""b c"",NULL}","(2,""z"")","{""k"": [1.0e1]}",7)"#,
            ),
            (PAIR_ARR, r#"{"(a,{},\"(,)\",null,1)",NULL}"#),
            (
                JSON,
                r#"{"b":1, "a": [1e2, -0.0, "\ud83d\ude00\n"], "a":{"x":true}}"#,
            ),
            (JSONB, r#"{"a": [1, 2.50, "x\"y"], "b": {}}"#),
            (FLOAT8, "-1.7976931348623157e+308"),
            (NUMERIC, "-123.4500"),
            (TIMESTAMPTZ, "0044-03-15 12:00:00.5+05:30:15 BC"),
            (TIMESTAMP, "2020-01-01 12:00:00.123"),
            (INT2VECTOR, "1 2 3"),
            (TEXT, "plain é"),
            (BOOL, "t"),
        ];
        let alphabet: &[u8] = b"{}[]()\",;:\\ -+.0123456789eEtfnulNUL=TBC\x00\xff\xc3\xa9x";
        let reg = registry();
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut out = Vec::new();
        for round in 0..50_000 {
            let (oid, base) = corpus[round % corpus.len()];
            let mut text = base.as_bytes().to_vec();
            for _ in 0..1 + rng.below(4) {
                let pos = rng.below(text.len() + 1);
                match rng.below(4) {
                    0 if pos < text.len() => {
                        text.remove(pos);
                    }
                    1 => text.insert(pos, alphabet[rng.below(alphabet.len())]),
                    2 if pos < text.len() => text[pos] = alphabet[rng.below(alphabet.len())],
                    _ => text.truncate(pos),
                }
            }
            // Render as every type, not just the one the literal was made for.
            for &o in &[oid, corpus[rng.below(corpus.len())].0] {
                out.clear();
                out.extend_from_slice(b"[");
                match render(&reg, o, &text, &mut out) {
                    Ok(()) => {
                        out.push(b']');
                        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&out) {
                            panic!(
                                "oid {o} text {:?} gave invalid JSON {:?}: {e}",
                                String::from_utf8_lossy(&text),
                                String::from_utf8_lossy(&out)
                            );
                        }
                    }
                    Err(_) => assert_eq!(out, b"["),
                }
            }
        }
    }
}
