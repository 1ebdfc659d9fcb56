//! Postgres types to Iceberg types, and `to_jsonb()` text to typed values.
//!
//! The mapping is decided from the column's type OID and type modifier when
//! the Iceberg column is created; from then on the Iceberg column's type is
//! the truth, and a value is converted to it from the JSON text the decoder
//! rendered (the same text `to_jsonb()` shows). A conversion never rounds:
//! a value that the column's type cannot hold exactly (a numeric `NaN`, an
//! infinite timestamp, a multi-dimensional array) is an error naming the
//! column, never a silent null.

use iceberg::spec::{ListType, NestedField, PrimitiveType, Type};

/// Postgres type OIDs the mapping knows.
mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const BOOL_ARRAY: u32 = 1000;
    pub const INT2_ARRAY: u32 = 1005;
    pub const INT4_ARRAY: u32 = 1007;
    pub const INT8_ARRAY: u32 = 1016;
    pub const TEXT_ARRAY: u32 = 1009;
    pub const VARCHAR_ARRAY: u32 = 1015;
    pub const FLOAT8_ARRAY: u32 = 1022;
}

/// The Iceberg type of a Postgres column. `list_id` is the field id for a
/// list's element (ids are reassigned by the catalog anyway).
pub fn iceberg_type(type_oid: u32, type_mod: i32, list_id: i32) -> Type {
    let p = |t: PrimitiveType| Type::Primitive(t);
    let list = |t: PrimitiveType| {
        Type::List(ListType::new(
            NestedField::list_element(list_id, Type::Primitive(t), false).into(),
        ))
    };
    match type_oid {
        oid::BOOL => p(PrimitiveType::Boolean),
        oid::INT2 | oid::INT4 => p(PrimitiveType::Int),
        oid::INT8 | oid::OID => p(PrimitiveType::Long),
        oid::FLOAT4 => p(PrimitiveType::Float),
        oid::FLOAT8 => p(PrimitiveType::Double),
        oid::NUMERIC => match numeric_precision(type_mod) {
            Some((precision, scale)) => p(PrimitiveType::Decimal { precision, scale }),
            None => p(PrimitiveType::String),
        },
        oid::DATE => p(PrimitiveType::Date),
        oid::TIME => p(PrimitiveType::Time),
        oid::TIMESTAMP => p(PrimitiveType::Timestamp),
        oid::TIMESTAMPTZ => p(PrimitiveType::Timestamptz),
        oid::UUID | oid::BYTEA => p(PrimitiveType::Binary),
        oid::BOOL_ARRAY => list(PrimitiveType::Boolean),
        oid::INT2_ARRAY | oid::INT4_ARRAY => list(PrimitiveType::Int),
        oid::INT8_ARRAY => list(PrimitiveType::Long),
        oid::FLOAT8_ARRAY => list(PrimitiveType::Double),
        oid::TEXT_ARRAY | oid::VARCHAR_ARRAY => list(PrimitiveType::String),
        // text, varchar, json, jsonb and everything else: the to_jsonb() text.
        _ => p(PrimitiveType::String),
    }
}

/// `numeric(p,s)`'s precision and scale when Iceberg's decimal holds it
/// (p ≤ 38, 0 ≤ s ≤ p); `None` for an unconstrained numeric or a wider one.
fn numeric_precision(type_mod: i32) -> Option<(u32, u32)> {
    if type_mod < 4 {
        return None;
    }
    let m = type_mod - 4;
    let precision = ((m >> 16) & 0xffff) as u32;
    // The scale is an 11-bit signed number (negative scales since PG 15).
    let raw = m & 0x7ff;
    let scale = if raw & 0x400 != 0 { raw - 0x800 } else { raw };
    if precision == 0 || precision > 38 || scale < 0 || scale as u32 > precision {
        return None;
    }
    Some((precision, scale as u32))
}

/// Whether a column of type `have` can keep taking a source column that
/// now maps to `want` without a change of its Iceberg type: the same type,
/// or a source that narrowed. An unconstrained numeric arriving for a
/// decimal column (a snapshot's relation carries no type modifier) is
/// accepted: its values are checked one by one.
pub fn compatible(have: &Type, want: &Type) -> bool {
    use PrimitiveType as P;
    match (have, want) {
        (Type::Primitive(P::Decimal { .. }), Type::Primitive(P::String)) => true,
        (Type::Primitive(P::Long), Type::Primitive(P::Int)) => true,
        (Type::Primitive(P::Double), Type::Primitive(P::Float)) => true,
        (
            Type::Primitive(P::Decimal {
                precision: hp,
                scale: hs,
            }),
            Type::Primitive(P::Decimal {
                precision: wp,
                scale: ws,
            }),
        ) => hs == ws && wp <= hp,
        (Type::List(a), Type::List(b)) => {
            compatible(&a.element_field.field_type, &b.element_field.field_type)
        }
        (a, b) => a == b,
    }
}

/// Parses `to_jsonb()`'s numeric text (`-12.3400`) into the unscaled integer
/// of a decimal with `scale` digits after the point. `None` when the text is
/// not a plain decimal number or has more fraction digits than `scale` (it
/// would round) or more than 38 digits.
pub fn decimal(text: &str, scale: u32) -> Option<i128> {
    let (neg, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > scale as usize {
        return None;
    }
    let mut v: i128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
    }
    for _ in frac.len()..scale as usize {
        v = v.checked_mul(10)?;
    }
    Some(if neg { -v } else { v })
}

/// Days since 1970-01-01 of `YYYY-MM-DD` (years 1..9999, AD).
pub fn date(text: &str) -> Option<i32> {
    let b = text.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let y: i64 = text[0..4].parse().ok()?;
    let m: u32 = text[5..7].parse().ok()?;
    let d: u32 = text[8..10].parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    i32::try_from(days_from_civil(y, m, d)).ok()
}

/// Microseconds since midnight of `HH:MM:SS[.ffffff]`.
pub fn time(text: &str) -> Option<i64> {
    let (hms, frac) = text.split_once('.').unwrap_or((text, ""));
    let b = hms.as_bytes();
    if b.len() != 8 || b[2] != b':' || b[5] != b':' {
        return None;
    }
    let h: i64 = hms[0..2].parse().ok()?;
    let m: i64 = hms[3..5].parse().ok()?;
    let s: i64 = hms[6..8].parse().ok()?;
    if h > 24 || m > 59 || s > 60 || frac.len() > 6 || !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut micros: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    for _ in frac.len()..6 {
        micros *= 10;
    }
    Some(((h * 60 + m) * 60 + s) * 1_000_000 + micros)
}

/// Microseconds since 1970-01-01 UTC of to_jsonb()'s `timestamp`
/// (`2024-05-01T10:00:00.5`) or `timestamptz` (`…+02:00`, `…-03:30:15`)
/// text. A timestamp without zone is taken as it is (no conversion).
pub fn timestamp(text: &str) -> Option<i64> {
    let (day, rest) = text.split_once('T')?;
    let days = i64::from(date(day)?);
    // The zone starts at the first '+' or '-' after the time.
    let zone_at = rest.find(['+', '-']).unwrap_or(rest.len());
    let (clock, zone) = rest.split_at(zone_at);
    let micros = time(clock)?;
    let offset = if zone.is_empty() {
        0
    } else {
        zone_offset(zone)?
    };
    Some(days * 86_400_000_000 + micros - offset * 1_000_000)
}

/// Seconds east of UTC of `+HH`, `+HH:MM` or `+HH:MM:SS`.
fn zone_offset(zone: &str) -> Option<i64> {
    let sign = if zone.starts_with('-') { -1 } else { 1 };
    let mut secs = 0i64;
    let mut unit = 3600;
    for part in zone[1..].split(':') {
        if part.len() != 2 || unit == 0 {
            return None;
        }
        secs += part.parse::<i64>().ok()? * unit;
        unit /= 60;
    }
    Some(sign * secs)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The bytes of a `bytea` (`\x0aff`) or `uuid` (`8-4-4-4-12` hex) text.
pub fn binary(text: &str) -> Option<Vec<u8>> {
    let hex = match text.strip_prefix("\\x") {
        Some(h) => h.to_string(),
        None if text.len() == 36 => text.replace('-', ""),
        None => return None,
    };
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A float from its JSON text: a number, or `"NaN"`, `"Infinity"`, `"-Infinity"`.
pub fn float(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        t => t.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numerics_keep_every_digit_or_are_refused() {
        assert_eq!(decimal("12.3400", 4), Some(123_400));
        assert_eq!(decimal("-0.5", 2), Some(-50));
        assert_eq!(decimal("7", 3), Some(7000));
        assert_eq!(decimal("1.23456", 4), None, "rounding refused");
        assert_eq!(decimal("NaN", 2), None);
        assert_eq!(decimal("1e5", 2), None);
        assert_eq!(
            decimal("12345678901234567890123456789012.345678", 6),
            Some(12_345_678_901_234_567_890_123_456_789_012_345_678)
        );
    }

    #[test]
    fn numeric_type_modifiers_pick_the_decimal() {
        // numeric(10,2): typmod = (10 << 16 | 2) + 4
        let t = iceberg_type(oid::NUMERIC, (10 << 16 | 2) + 4, 0);
        assert_eq!(
            t,
            Type::Primitive(PrimitiveType::Decimal {
                precision: 10,
                scale: 2
            })
        );
        assert_eq!(
            iceberg_type(oid::NUMERIC, -1, 0),
            Type::Primitive(PrimitiveType::String)
        );
        let wide = iceberg_type(oid::NUMERIC, (40 << 16 | 2) + 4, 0);
        assert_eq!(wide, Type::Primitive(PrimitiveType::String));
    }

    #[test]
    fn dates_times_and_timestamps_are_exact() {
        assert_eq!(date("1970-01-01"), Some(0));
        assert_eq!(date("2000-03-01"), Some(11_017));
        assert_eq!(date("infinity"), None);
        assert_eq!(time("00:00:01.5"), Some(1_500_000));
        assert_eq!(timestamp("1970-01-01T00:00:00"), Some(0));
        assert_eq!(timestamp("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(timestamp("1969-12-31T23:59:59.999999"), Some(-1));
        assert_eq!(
            timestamp("2024-05-01T10:00:00.123456-03:30"),
            Some(1_714_570_200_123_456)
        );
        assert_eq!(timestamp("infinity"), None);
    }

    #[test]
    fn binary_from_bytea_and_uuid_text() {
        assert_eq!(binary("\\x0aff"), Some(vec![10, 255]));
        assert_eq!(binary("\\x"), Some(vec![]));
        assert_eq!(
            binary("00112233-4455-6677-8899-aabbccddeeff").map(|b| b.len()),
            Some(16)
        );
        assert_eq!(binary("zz"), None);
    }
}
