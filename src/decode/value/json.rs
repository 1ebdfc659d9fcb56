//! `json` and `jsonb` values. A `jsonb` value arrives in jsonb's own text
//! form already, so it is only validated and copied. A `json` value arrives
//! as the user wrote it, so it is parsed and re-emitted the way jsonb would
//! store it (jsonb's spacing, key order and last-duplicate-key-wins), which
//! makes both equal `to_jsonb()`.
//!
//! Invariants: malformed input gives a [`ValueError`], never a panic, and the
//! caller then falls back to a JSON string of the raw text. The parser keeps
//! its own stack, so any nesting depth the server accepted is fine.

use super::*;

const KIND: &str = "json";

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn hex4(s: &[u8]) -> Option<u32> {
    if s.len() < 4 {
        return None;
    }
    let mut v = 0u32;
    for &b in &s[..4] {
        v = v * 16 + (b as char).to_digit(16)?;
    }
    Some(v)
}

/// End of the number token starting at `i` (its syntax checked later).
fn number_end(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && matches!(s[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
        i += 1;
    }
    i
}

/// Scans a string token starting after its opening quote; returns the
/// index of the closing quote and whether it contains escapes.
fn string_end(s: &[u8], mut i: usize) -> Result<(usize, bool), ValueError> {
    let mut escaped = false;
    loop {
        match s.get(i) {
            None => return Err(malformed(KIND, "unterminated string")),
            Some(b'"') => return Ok((i, escaped)),
            Some(b'\\') => {
                escaped = true;
                match s.get(i + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                    Some(b'u') => {
                        let cp = hex4(&s[i + 2..]).ok_or(malformed(KIND, "bad \\u escape"))?;
                        i += 6;
                        // Surrogates must pair up (strict parsers, and
                        // jsonb, reject lone ones).
                        if (0xDC00..0xE000).contains(&cp) {
                            return Err(ValueError::UnsupportedEscape);
                        }
                        if (0xD800..0xDC00).contains(&cp) {
                            let low = if s[i..].starts_with(b"\\u") {
                                hex4(&s[i + 2..])
                            } else {
                                None
                            };
                            if !low.is_some_and(|lo| (0xDC00..0xE000).contains(&lo)) {
                                return Err(ValueError::UnsupportedEscape);
                            }
                            i += 6;
                        }
                    }
                    _ => return Err(malformed(KIND, "bad escape")),
                }
            }
            Some(&b) if b < 0x20 => return Err(malformed(KIND, "control character in string")),
            Some(_) => i += 1,
        }
    }
}

/// A stack of booleans: the first 128 in two words, the rest on the heap
/// (so validating ordinary jsonb allocates nothing).
#[derive(Default)]
struct BoolStack {
    bits: u128,
    len: usize,
    spill: Vec<bool>,
}

impl BoolStack {
    fn push(&mut self, v: bool) {
        if self.len < 128 {
            self.bits = (self.bits & !(1 << self.len)) | (u128::from(v) << self.len);
        } else {
            self.spill.push(v);
        }
        self.len += 1;
    }

    fn pop(&mut self) {
        if self.len > 128 {
            self.spill.pop();
        }
        self.len = self.len.saturating_sub(1);
    }

    fn last(&self) -> Option<bool> {
        match self.len {
            0 => None,
            n if n <= 128 => Some((self.bits >> (n - 1)) & 1 == 1),
            _ => self.spill.last().copied(),
        }
    }
}

/// Checks that `s` (already known to be UTF-8) is one JSON value.
/// Iterative, so arbitrarily deep jsonb is fine.
pub(super) fn validate(s: &[u8]) -> Result<(), ValueError> {
    // Open containers: true = object.
    let mut stack = BoolStack::default();
    let skip = |i: &mut usize| {
        while *i < s.len() && is_space(s[*i]) {
            *i += 1;
        }
    };
    let mut i = 0;
    'value: loop {
        skip(&mut i);
        match s.get(i) {
            Some(b'{') => {
                i += 1;
                skip(&mut i);
                if s.get(i) == Some(&b'}') {
                    i += 1;
                } else {
                    stack.push(true);
                    key(s, &mut i)?;
                    continue 'value;
                }
            }
            Some(b'[') => {
                i += 1;
                skip(&mut i);
                if s.get(i) == Some(&b']') {
                    i += 1;
                } else {
                    stack.push(false);
                    continue 'value;
                }
            }
            Some(b'"') => i = string_end(s, i + 1)?.0 + 1,
            Some(b't') if s[i..].starts_with(b"true") => i += 4,
            Some(b'f') if s[i..].starts_with(b"false") => i += 5,
            Some(b'n') if s[i..].starts_with(b"null") => i += 4,
            Some(b'-' | b'0'..=b'9') => {
                let e = number_end(s, i);
                parse_number(&s[i..e]).ok_or(malformed(KIND, "bad number"))?;
                i = e;
            }
            _ => return Err(malformed(KIND, "expected a value")),
        }
        // After a complete value: close containers / move to the next item.
        loop {
            skip(&mut i);
            let Some(is_obj) = stack.last() else {
                return if i == s.len() {
                    Ok(())
                } else {
                    Err(malformed(KIND, "text after the value"))
                };
            };
            match s.get(i) {
                Some(b',') => {
                    i += 1;
                    if is_obj {
                        skip(&mut i);
                        key(s, &mut i)?;
                    }
                    continue 'value;
                }
                Some(b'}') if is_obj => {
                    i += 1;
                    stack.pop();
                }
                Some(b']') if !is_obj => {
                    i += 1;
                    stack.pop();
                }
                _ => return Err(malformed(KIND, "expected , or a closing bracket")),
            }
        }
    }

    /// `"key" :` starting at `i`.
    fn key(s: &[u8], i: &mut usize) -> Result<(), ValueError> {
        if s.get(*i) != Some(&b'"') {
            return Err(malformed(KIND, "expected an object key"));
        }
        *i = string_end(s, *i + 1)?.0 + 1;
        while *i < s.len() && is_space(s[*i]) {
            *i += 1;
        }
        if s.get(*i) != Some(&b':') {
            return Err(malformed(KIND, "expected :"));
        }
        *i += 1;
        Ok(())
    }
}

/// A json value in the arena built by [`normalize`].
enum Val<'a> {
    Null,
    Bool(bool),
    Number(&'a [u8]),
    Str(Cow<'a, str>),
    /// Child node indexes.
    Array(Vec<usize>),
    /// Child node indexes (each child carries its key).
    Object(Vec<usize>),
}

struct Node<'a> {
    /// The member name when the parent is an object.
    key: Option<Cow<'a, str>>,
    val: Val<'a>,
}

/// The decoded contents of a string token starting at its opening quote at
/// `i`; returns the index after the closing quote.
fn string<'a>(s: &'a str, i: usize) -> Result<(Cow<'a, str>, usize), ValueError> {
    let start = i + 1;
    let (end, escaped) = string_end(s.as_bytes(), start)?;
    // Quotes and backslashes are ASCII, so these are char boundaries.
    let raw = &s[start..end];
    if !escaped {
        return Ok((Cow::Borrowed(raw), end + 1));
    }
    let rb = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut k = 0;
    while k < rb.len() {
        let run = k;
        while k < rb.len() && rb[k] != b'\\' {
            k += 1;
        }
        out.push_str(&raw[run..k]);
        if k >= rb.len() {
            break;
        }
        // string_end checked every escape, so rb[k + 1] exists.
        let c = rb[k + 1];
        k += 2;
        match c {
            b'b' => out.push('\u{8}'),
            b'f' => out.push('\u{c}'),
            b'n' => out.push('\n'),
            b'r' => out.push('\r'),
            b't' => out.push('\t'),
            b'u' => {
                let hi = hex4(&rb[k..]).ok_or(malformed(KIND, "bad \\u escape"))?;
                k += 4;
                let cp = if (0xD800..0xDC00).contains(&hi) {
                    let lo = if rb[k..].starts_with(b"\\u") {
                        hex4(&rb[k + 2..])
                    } else {
                        None
                    };
                    match lo {
                        Some(lo) if (0xDC00..0xE000).contains(&lo) => {
                            k += 6;
                            0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                        }
                        _ => return Err(ValueError::UnsupportedEscape),
                    }
                } else if (0xDC00..0xE000).contains(&hi) || hi == 0 {
                    return Err(ValueError::UnsupportedEscape);
                } else {
                    hi
                };
                out.push(char::from_u32(cp).ok_or(ValueError::UnsupportedEscape)?);
            }
            other => out.push(other as char), // " \ /
        }
    }
    Ok((Cow::Owned(out), end + 1))
}

fn skip_space(b: &[u8], i: &mut usize) {
    while *i < b.len() && is_space(b[*i]) {
        *i += 1;
    }
}

/// `"key" :` at `i` (after whitespace).
fn member_key<'a>(s: &'a str, i: &mut usize) -> Result<Cow<'a, str>, ValueError> {
    let b = s.as_bytes();
    skip_space(b, i);
    if b.get(*i) != Some(&b'"') {
        return Err(malformed(KIND, "expected an object key"));
    }
    let (k, next) = string(s, *i)?;
    *i = next;
    skip_space(b, i);
    if b.get(*i) != Some(&b':') {
        return Err(malformed(KIND, "expected :"));
    }
    *i += 1;
    Ok(k)
}

/// The value token at `i` (after whitespace), and whether it opens a
/// non-empty container; `i` moves past what was read.
fn value_token<'a>(s: &'a str, i: &mut usize) -> Result<(Val<'a>, bool), ValueError> {
    let b = s.as_bytes();
    let r = match b.get(*i) {
        Some(b'{') => {
            *i += 1;
            skip_space(b, i);
            let empty = b.get(*i) == Some(&b'}');
            if empty {
                *i += 1;
            }
            (Val::Object(Vec::new()), !empty)
        }
        Some(b'[') => {
            *i += 1;
            skip_space(b, i);
            let empty = b.get(*i) == Some(&b']');
            if empty {
                *i += 1;
            }
            (Val::Array(Vec::new()), !empty)
        }
        Some(b'"') => {
            let (v, next) = string(s, *i)?;
            *i = next;
            (Val::Str(v), false)
        }
        Some(b't') if b[*i..].starts_with(b"true") => {
            *i += 4;
            (Val::Bool(true), false)
        }
        Some(b'f') if b[*i..].starts_with(b"false") => {
            *i += 5;
            (Val::Bool(false), false)
        }
        Some(b'n') if b[*i..].starts_with(b"null") => {
            *i += 4;
            (Val::Null, false)
        }
        Some(b'-' | b'0'..=b'9') => {
            let e = number_end(b, *i);
            let num = &b[*i..e];
            parse_number(num).ok_or(malformed(KIND, "bad number"))?;
            *i = e;
            (Val::Number(num), false)
        }
        _ => return Err(malformed(KIND, "expected a value")),
    };
    Ok(r)
}

/// Parses `s` into an arena of nodes (root at index 0), iteratively so any
/// depth the server accepted is fine.
fn parse(s: &str) -> Result<Vec<Node<'_>>, ValueError> {
    let b = s.as_bytes();
    let mut nodes: Vec<Node<'_>> = Vec::new();
    // Open containers (node indexes).
    let mut open: Vec<usize> = Vec::new();
    let mut key: Option<Cow<'_, str>> = None;
    let mut i = 0;
    'value: loop {
        skip_space(b, &mut i);
        let (val, opens) = value_token(s, &mut i)?;
        let idx = nodes.len();
        let is_obj = matches!(val, Val::Object(_));
        nodes.push(Node {
            key: key.take(),
            val,
        });
        if let Some(&parent) = open.last() {
            if let Val::Array(c) | Val::Object(c) = &mut nodes[parent].val {
                c.push(idx);
            }
        }
        if opens {
            open.push(idx);
            if is_obj {
                key = Some(member_key(s, &mut i)?);
            }
            continue 'value;
        }
        // After a complete value: close containers / move to the next item.
        loop {
            skip_space(b, &mut i);
            let Some(&parent) = open.last() else {
                return if i == b.len() {
                    Ok(nodes)
                } else {
                    Err(malformed(KIND, "text after the value"))
                };
            };
            let in_obj = matches!(nodes[parent].val, Val::Object(_));
            match b.get(i) {
                Some(b',') => {
                    i += 1;
                    if in_obj {
                        key = Some(member_key(s, &mut i)?);
                    }
                    continue 'value;
                }
                Some(b'}') if in_obj => {
                    i += 1;
                    open.pop();
                }
                Some(b']') if !in_obj => {
                    i += 1;
                    open.pop();
                }
                _ => return Err(malformed(KIND, "expected , or a closing bracket")),
            }
        }
    }
}

enum Step {
    Node(usize),
    /// Write a member's key, then its value.
    Member(usize),
    Text(&'static [u8]),
}

/// Writes the arena as jsonb prints it, iteratively.
fn emit(nodes: &mut [Node<'_>], out: &mut Vec<u8>) -> Result<(), ValueError> {
    let mut work = vec![Step::Node(0)];
    while let Some(step) = work.pop() {
        let idx = match step {
            Step::Text(t) => {
                out.extend_from_slice(t);
                continue;
            }
            Step::Member(m) => {
                out.push(b'"');
                escape_into(nodes[m].key.as_deref().unwrap_or("").as_bytes(), out);
                out.extend_from_slice(b"\": ");
                m
            }
            Step::Node(n) => n,
        };
        match &mut nodes[idx].val {
            Val::Null => out.extend_from_slice(b"null"),
            Val::Bool(true) => out.extend_from_slice(b"true"),
            Val::Bool(false) => out.extend_from_slice(b"false"),
            Val::Number(n) => {
                let parts = parse_number(n).ok_or(malformed(KIND, "bad number"))?;
                write_number_parts(&parts, n, out)?;
            }
            Val::Str(s) => {
                out.push(b'"');
                escape_into(s.as_bytes(), out);
                out.push(b'"');
            }
            Val::Array(children) => {
                let children = std::mem::take(children);
                out.push(b'[');
                work.push(Step::Text(b"]"));
                for (k, &c) in children.iter().enumerate().rev() {
                    work.push(Step::Node(c));
                    if k > 0 {
                        work.push(Step::Text(b", "));
                    }
                }
            }
            Val::Object(children) => {
                let mut children = std::mem::take(children);
                // jsonb order: shorter keys first, then bytewise. The sort
                // is stable, so among equal keys the last one written is
                // last; jsonb keeps that one.
                let key = |c: &usize| nodes[*c].key.as_deref().unwrap_or("").as_bytes();
                children.sort_by(|a, b| {
                    let (ka, kb) = (key(a), key(b));
                    ka.len().cmp(&kb.len()).then_with(|| ka.cmp(kb))
                });
                children.dedup_by(|later, earlier| {
                    if key(later) == key(earlier) {
                        std::mem::swap(later, earlier);
                        true
                    } else {
                        false
                    }
                });
                out.push(b'{');
                work.push(Step::Text(b"}"));
                for (k, &c) in children.iter().enumerate().rev() {
                    work.push(Step::Member(c));
                    if k > 0 {
                        work.push(Step::Text(b", "));
                    }
                }
            }
        }
    }
    Ok(())
}

/// json text → the jsonb `to_jsonb` makes of it, as jsonb prints it.
pub(super) fn normalize(text: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
    let s = std::str::from_utf8(text).map_err(|_| ValueError::InvalidUtf8)?;
    let mut nodes = parse(s)?;
    emit(&mut nodes, out)
}
