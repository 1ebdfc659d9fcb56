//! The change rows buffered for one table, and their Arrow record batch.
//!
//! A buffered row keeps the row image the decoder made (the `to_jsonb()`
//! text of each value) and a map from the Iceberg table's source fields to
//! the relation's columns as they were when the change was made. Fields are
//! only ever appended to the Iceberg schema, so a map made before a column
//! was added stays valid: the new field is past its end and the row gets
//! null there. Values are converted to the Iceberg type only when the batch
//! is built, each one exactly or not at all.

use std::sync::Arc;

use arrow_array::builder::{ListBuilder, OffsetBufferBuilder, StringBuilder};
use arrow_array::types::{
    Date32Type, Decimal128Type, Float32Type, Float64Type, Int32Type, Int64Type,
    Time64MicrosecondType, TimestampMicrosecondType,
};
use arrow_array::{
    ArrayRef, ArrowPrimitiveType, BooleanArray, LargeBinaryArray, ListArray, PrimitiveArray,
    RecordBatch, StringArray,
};
use arrow_schema::{DataType, FieldRef, Schema as ArrowSchema, TimeUnit};

use super::types;
use crate::event::{Cell, Op, RelationInfo, Row};
use crate::lsn::Lsn;

/// The change-log columns after the source columns.
pub const META_COLUMNS: [&str; 6] = [
    "_op",
    "_lsn",
    "_commit_lsn",
    "_commit_time",
    "_xid",
    "_unchanged",
];

/// Microseconds from 1970-01-01 to 2000-01-01 (Postgres' epoch).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// One change row waiting for its commit.
pub struct BufferedRow {
    pub op: Op,
    /// The image written: the new row, the old one for a delete, none for a truncate.
    pub row: Option<Row>,
    /// Source field `i` of the Iceberg schema is relation column `map[i]`.
    pub map: Arc<[Option<usize>]>,
    pub rel: Arc<RelationInfo>,
    pub lsn: Lsn,
    pub commit_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    pub xid: u32,
}

impl BufferedRow {
    /// Bytes held, for the buffer bound.
    pub fn mem_size(&self) -> usize {
        std::mem::size_of::<Self>() + self.row.as_ref().map_or(0, Row::mem_size)
    }

    /// The value text of source field `field`, or `None` (NULL, unchanged, not in the row).
    fn text(&self, field: usize) -> Option<std::borrow::Cow<'_, str>> {
        let col = (*self.map.get(field)?)?;
        self.row.as_ref()?.text(col)
    }

    fn json(&self, field: usize) -> Option<&[u8]> {
        let col = (*self.map.get(field)?)?;
        self.row.as_ref()?.json(col)
    }

    /// The names of the TOAST columns the change did not send.
    fn unchanged(&self) -> Vec<&str> {
        let Some(row) = &self.row else {
            return Vec::new();
        };
        (0..row.cells.len())
            .filter(|&i| row.cell(i) == Cell::Unchanged)
            .filter_map(|i| self.rel.columns.get(i).map(|c| c.name.as_str()))
            .collect()
    }
}

/// Builds the record batch of `rows` for the Arrow form of the table's
/// schema. `fields[i]` is the source field index of Arrow column `i`, or
/// `None` for a change-log column. The error names the column and the value.
pub fn build(
    schema: Arc<ArrowSchema>,
    fields: &[Option<usize>],
    rows: &[BufferedRow],
) -> Result<RecordBatch, String> {
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (i, f) in schema.fields().iter().enumerate() {
        let col = match fields[i] {
            Some(field) => source_column(f, rows, field),
            None => meta_column(f, rows),
        };
        columns.push(col.map_err(|e| format!("column {:?}: {e}", f.name()))?);
    }
    RecordBatch::try_new(schema, columns).map_err(|e| format!("building the record batch: {e}"))
}

/// A change-log column.
fn meta_column(f: &FieldRef, rows: &[BufferedRow]) -> Result<ArrayRef, String> {
    let lsn = |l: Lsn| l.0 as i64;
    Ok(match f.name().as_str() {
        "_op" => Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.op.as_str()),
        )),
        "_lsn" => Arc::new(PrimitiveArray::<Int64Type>::from_iter_values(
            rows.iter().map(|r| lsn(r.lsn)),
        )),
        "_commit_lsn" => Arc::new(PrimitiveArray::<Int64Type>::from_iter_values(
            rows.iter().map(|r| lsn(r.commit_lsn)),
        )),
        "_xid" => Arc::new(PrimitiveArray::<Int64Type>::from_iter_values(
            rows.iter().map(|r| i64::from(r.xid)),
        )),
        "_commit_time" => Arc::new(
            PrimitiveArray::<TimestampMicrosecondType>::from_iter_values(
                rows.iter().map(|r| r.commit_time + PG_EPOCH_MICROS),
            )
            .with_timezone_opt(timezone(f.data_type())),
        ),
        "_unchanged" => {
            let DataType::List(item) = f.data_type() else {
                return Err(format!("is {}, not a list of strings", f.data_type()));
            };
            let mut b = ListBuilder::new(StringBuilder::new()).with_field(item.clone());
            for r in rows {
                let names = r.unchanged();
                if names.is_empty() {
                    b.append_null();
                } else {
                    names.iter().for_each(|n| b.values().append_value(n));
                    b.append(true);
                }
            }
            Arc::new(b.finish())
        }
        other => return Err(format!("{other:?} is not a change-log column")),
    })
}

fn timezone(t: &DataType) -> Option<Arc<str>> {
    match t {
        DataType::Timestamp(_, tz) => tz.clone(),
        _ => None,
    }
}

/// A primitive column parsed from each row's value text.
fn primitive<T: ArrowPrimitiveType>(
    rows: &[BufferedRow],
    field: usize,
    what: &str,
    parse: impl Fn(&str) -> Option<T::Native>,
) -> Result<PrimitiveArray<T>, String> {
    rows.iter()
        .map(|r| match r.text(field) {
            None => Ok(None),
            Some(t) => parse(&t)
                .map(Some)
                .ok_or_else(|| format!("the value {t:?} (at {}) is not an exact {what}", r.lsn)),
        })
        .collect()
}

/// A source column, typed as the Iceberg field says.
fn source_column(f: &FieldRef, rows: &[BufferedRow], field: usize) -> Result<ArrayRef, String> {
    Ok(match f.data_type() {
        DataType::Boolean => Arc::new(
            rows.iter()
                .map(|r| match r.text(field).as_deref() {
                    None => Ok(None),
                    Some("true") => Ok(Some(true)),
                    Some("false") => Ok(Some(false)),
                    Some(t) => Err(format!("the value {t:?} is not a boolean")),
                })
                .collect::<Result<BooleanArray, String>>()?,
        ),
        DataType::Int32 => Arc::new(primitive::<Int32Type>(rows, field, "int", |t| {
            t.parse().ok()
        })?),
        DataType::Int64 => Arc::new(primitive::<Int64Type>(rows, field, "long", |t| {
            t.parse().ok()
        })?),
        DataType::Float32 => Arc::new(primitive::<Float32Type>(rows, field, "float", |t| {
            types::float(t).map(|v| v as f32)
        })?),
        DataType::Float64 => Arc::new(primitive::<Float64Type>(
            rows,
            field,
            "double",
            types::float,
        )?),
        DataType::Decimal128(p, s) => {
            let limit = 10i128.pow(u32::from(*p));
            let scale = *s as u32;
            let a = primitive::<Decimal128Type>(
                rows,
                field,
                "decimal of this precision and scale",
                |t| types::decimal(t, scale).filter(|v| v.abs() < limit),
            )?;
            Arc::new(
                a.with_precision_and_scale(*p, *s)
                    .map_err(|e| e.to_string())?,
            )
        }
        DataType::Date32 => Arc::new(primitive::<Date32Type>(rows, field, "date", types::date)?),
        DataType::Time64(TimeUnit::Microsecond) => Arc::new(primitive::<Time64MicrosecondType>(
            rows,
            field,
            "time",
            types::time,
        )?),
        DataType::Timestamp(TimeUnit::Microsecond, tz) => Arc::new(
            primitive::<TimestampMicrosecondType>(rows, field, "timestamp", types::timestamp)?
                .with_timezone_opt(tz.clone()),
        ),
        DataType::Utf8 => Arc::new(rows.iter().map(|r| r.text(field)).collect::<StringArray>()),
        DataType::LargeBinary => Arc::new(
            rows.iter()
                .map(|r| match r.text(field) {
                    None => Ok(None),
                    Some(t) => types::binary(&t)
                        .map(Some)
                        .ok_or_else(|| format!("the value {t:?} is not bytea or uuid text")),
                })
                .collect::<Result<LargeBinaryArray, String>>()?,
        ),
        DataType::List(item) => Arc::new(list(item, rows, field)?),
        other => {
            return Err(format!(
                "the Iceberg type (Arrow {other}) is not one pgferry writes"
            ))
        }
    })
}

/// A list column from each row's JSON array (one-dimensional only).
fn list(item: &FieldRef, rows: &[BufferedRow], field: usize) -> Result<ListArray, String> {
    let mut offsets = OffsetBufferBuilder::<i32>::new(rows.len());
    let mut valid = Vec::with_capacity(rows.len());
    let mut texts: Vec<Option<String>> = Vec::new();
    for r in rows {
        let before = texts.len();
        match r.json(field) {
            None => valid.push(false),
            Some(json) => {
                let items: Vec<serde_json::Value> = serde_json::from_slice(json)
                    .map_err(|e| format!("the value is not a JSON array: {e}"))?;
                for v in items {
                    texts.push(match v {
                        serde_json::Value::Null => None,
                        serde_json::Value::String(s) => Some(s),
                        serde_json::Value::Array(_) => {
                            return Err(format!(
                                "a multi-dimensional array (at {}) does not fit a list; \
                                 store the column as text (change its type) or leave the table out",
                                r.lsn
                            ))
                        }
                        other => Some(other.to_string()),
                    });
                }
                valid.push(true);
            }
        }
        offsets.push_length(texts.len() - before);
    }
    let values = element_array(item.data_type(), &texts)?;
    ListArray::try_new(item.clone(), offsets.finish(), values, Some(valid.into()))
        .map_err(|e| e.to_string())
}

/// The element array of a list, from the elements' texts.
fn element_array(t: &DataType, texts: &[Option<String>]) -> Result<ArrayRef, String> {
    fn each<T: ArrowPrimitiveType>(
        texts: &[Option<String>],
        parse: impl Fn(&str) -> Option<T::Native>,
    ) -> Result<ArrayRef, String> {
        let a: PrimitiveArray<T> = texts
            .iter()
            .map(|t| match t {
                None => Ok(None),
                Some(t) => parse(t)
                    .map(Some)
                    .ok_or_else(|| format!("the element {t:?} does not fit")),
            })
            .collect::<Result<_, String>>()?;
        Ok(Arc::new(a))
    }
    match t {
        DataType::Int32 => each::<Int32Type>(texts, |t| t.parse().ok()),
        DataType::Int64 => each::<Int64Type>(texts, |t| t.parse().ok()),
        DataType::Float64 => each::<Float64Type>(texts, types::float),
        DataType::Boolean => Ok(Arc::new(
            texts
                .iter()
                .map(|t| t.as_deref().map(|t| t == "true"))
                .collect::<BooleanArray>(),
        )),
        DataType::Utf8 => Ok(Arc::new(
            texts.iter().map(|t| t.as_deref()).collect::<StringArray>(),
        )),
        other => Err(format!("lists of {other} are not written")),
    }
}
