//! `COPY … TO STDOUT` text format → rendered rows. Pure functions, no I/O.
//!
//! The text format is one row per line, columns separated by a tab, `\N`
//! for NULL, and backslash escapes for the bytes that would be ambiguous
//! (`\\`, `\t`, `\n`, `\r`, plus `\b \f \v`, octal `\NNN` and `\xHH` which
//! Postgres accepts on input and may emit). After unescaping, a value is
//! exactly the type's output function text, the same text pgoutput sends,
//! so it goes through the same renderer and becomes byte-identical JSON.
//!
//! Invariants: a malformed line (wrong column count, dangling escape) is an
//! error naming the line, never a panic; a value the renderer refuses is
//! kept as a JSON string of its text, like the stream does.

use crate::decode::types::TypeRegistry;
use crate::decode::value;
use crate::event::{Cell, Row};

/// Parses and renders COPY text lines.
pub struct RowParser<'a> {
    pub types: &'a TypeRegistry,
    /// Type OID of each column, in COPY column order.
    pub type_oids: &'a [u32],
    /// Indexes of the key columns, in key order.
    pub key_cols: &'a [usize],
    scratch: Vec<u8>,
}

impl<'a> RowParser<'a> {
    pub fn new(types: &'a TypeRegistry, type_oids: &'a [u32], key_cols: &'a [usize]) -> Self {
        RowParser {
            types,
            type_oids,
            key_cols,
            scratch: Vec::new(),
        }
    }

    /// Parses one line (without its `\n`).
    pub fn parse_line(&mut self, line: &[u8]) -> Result<Row, String> {
        let n = self.type_oids.len();
        let mut row = Row {
            buf: Vec::with_capacity(line.len() + 4 * n),
            cells: Vec::with_capacity(n),
        };
        let mut fields = 0usize;
        for (i, field) in line.split(|&b| b == b'\t').enumerate() {
            fields += 1;
            let Some(&oid) = self.type_oids.get(i) else {
                continue;
            };
            if field == b"\\N" {
                row.cells.push(Cell::Null);
                continue;
            }
            let text: &[u8] = if field.contains(&b'\\') {
                unescape(field, &mut self.scratch)?;
                &self.scratch
            } else {
                field
            };
            let start = row.buf.len();
            value::render_or_string(self.types, oid, text, &mut row.buf);
            row.cells.push(Cell::Value {
                start: start as u32,
                end: row.buf.len() as u32,
            });
        }
        if fields != n {
            return Err(format!("COPY row has {fields} columns, expected {n}"));
        }
        Ok(row)
    }

    /// The text of the key columns of a line (for the next chunk's bound).
    pub fn key_text(&mut self, line: &[u8]) -> Result<Vec<String>, String> {
        let fields: Vec<&[u8]> = line.split(|&b| b == b'\t').collect();
        self.key_cols
            .iter()
            .map(|&c| {
                let f = fields.get(c).ok_or("COPY row is missing a key column")?;
                unescape(f, &mut self.scratch)?;
                Ok(String::from_utf8_lossy(&self.scratch).into_owned())
            })
            .collect()
    }
}

/// The matching key of a row: the rendered JSON of each key column, each
/// followed by a 0 byte (which JSON text never contains). `None` when a key
/// column is missing or unchanged.
pub fn key_of_opt(row: &Row, cols: impl IntoIterator<Item = Option<usize>>) -> Option<Vec<u8>> {
    let mut k = Vec::new();
    for c in cols {
        let c = c?;
        match row.cells.get(c)? {
            Cell::Value { .. } => k.extend_from_slice(row.json(c)?),
            Cell::Null => k.extend_from_slice(b"null"),
            Cell::Unchanged => return None,
        }
        k.push(0);
    }
    Some(k)
}

/// Undoes COPY text escaping into `out` (cleared first).
pub fn unescape(field: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    out.clear();
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let Some(&e) = field.get(i + 1) else {
            return Err("COPY value ends with a lone backslash".into());
        };
        i += 2;
        match e {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = (e - b'0') as u32;
                let mut k = 0;
                while k < 2 && matches!(field.get(i), Some(b'0'..=b'7')) {
                    v = v * 8 + (field[i] - b'0') as u32;
                    i += 1;
                    k += 1;
                }
                out.push(v as u8);
            }
            b'x' if field.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u32;
                let mut k = 0;
                while k < 2 && field.get(i).is_some_and(u8::is_ascii_hexdigit) {
                    v = v * 16 + (field[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                    k += 1;
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_undone() {
        let mut out = Vec::new();
        unescape(br"a\tb\\c\nd\101\x41\.", &mut out).unwrap();
        assert_eq!(out, b"a\tb\\c\ndAA.");
        assert!(unescape(b"abc\\", &mut out).is_err());
    }

    #[test]
    fn lines_render_like_the_stream() {
        let types = TypeRegistry::builtin();
        // int8, text, numeric, bool, text[]
        let oids = [20, 25, 1700, 16, 1009];
        let mut p = RowParser::new(&types, &oids, &[0]);
        let line = b"42\tsay \\\"hi\\\"\\ttab\t1.50\tt\t{a,\"b c\",NULL}";
        let r = p.parse_line(line).unwrap();
        assert_eq!(r.json(0), Some(&b"42"[..]));
        assert_eq!(r.json(1), Some(&b"\"say \\\"hi\\\"\\ttab\""[..]));
        assert_eq!(r.json(2), Some(&b"1.50"[..]));
        assert_eq!(r.json(3), Some(&b"true"[..]));
        assert_eq!(r.json(4), Some(&br#"["a", "b c", null]"#[..]));
        assert_eq!(key_of_opt(&r, [Some(0)]).unwrap(), b"42\0");
        assert_eq!(p.key_text(line).unwrap(), vec!["42".to_string()]);
        let r = p.parse_line(b"7\t\\N\t\\N\tf\t\\N").unwrap();
        assert_eq!(r.cell(1), Cell::Null);
        assert!(p.parse_line(b"1\t2").is_err());
        assert!(p.parse_line(b"1\t2\t3\tt\t{}\t6").is_err());
    }
}
