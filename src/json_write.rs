//! Writing JSON text: strings escaped exactly as Postgres's `escape_json`
//! does, and the calendar arithmetic used to write dates.
//!
//! Shared by the value renderer (`decode`), the event writer (`event`) and
//! the sinks; it imports nothing of the crate, so anything may use it.
//!
//! Invariants: [`write_json_string`] always produces valid JSON (invalid
//! UTF-8 becomes U+FFFD); [`escape_into`] expects valid UTF-8 and adds no
//! quotes.

/// What follows the backslash for bytes escape_json escapes; `u` means
/// `\u00XX`, 0 means the byte is copied.
static ESCAPES: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Escapes valid UTF-8 the way Postgres's `escape_json` does (`\b \f \n \r \t
/// \" \\`, other control characters as `\u00xx`, nothing else), without quotes.
pub fn escape_into(s: &[u8], out: &mut Vec<u8>) {
    let mut run = 0;
    for (i, &b) in s.iter().enumerate() {
        let e = ESCAPES[b as usize];
        if e == 0 {
            continue;
        }
        out.extend_from_slice(&s[run..i]);
        if e == b'u' {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 15) as usize],
            ]);
        } else {
            out.extend_from_slice(&[b'\\', e]);
        }
        run = i + 1;
    }
    out.extend_from_slice(&s[run..]);
}

/// Appends `s` as a JSON string, escaped like Postgres's `escape_json`.
///
/// Never fails: byte sequences that are not valid UTF-8 become U+FFFD, so the
/// result is always valid JSON (this is the fallback for text the value
/// renderer, `decode::value::render`, rejected). The renderer itself reports
/// invalid UTF-8 as an error instead.
pub fn write_json_string(s: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    if std::str::from_utf8(s).is_ok() {
        escape_into(s, out);
    } else {
        for chunk in s.utf8_chunks() {
            escape_into(chunk.valid().as_bytes(), out);
            if !chunk.invalid().is_empty() {
                out.extend_from_slice("\u{FFFD}".as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian, year 0
/// being 1 BC as in the server (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_json_string_replaces_invalid_utf8() {
        let mut out = Vec::new();
        write_json_string(b"a\xff\"b", &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "\"a\u{FFFD}\\\"b\"");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(10_957), (2000, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        // 0001-01-01 and the day before it, 1 BC (year 0) in the server's count.
        assert_eq!(civil_from_days(-719_162), (1, 1, 1));
        assert_eq!(civil_from_days(-719_163), (0, 12, 31));
    }
}
