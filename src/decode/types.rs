//! The type registry: for each type OID, the rule `value::render` follows
//! to turn the type's text output into JSON.
//!
//! Built-in types have fixed OIDs, so [`TypeRegistry::builtin`] knows them from a
//! static table. Everything else (enums, domains, composites, ranges, extension
//! types, the array types of all of these, and the row types of system catalogs)
//! is looked up in `pg_type` by [`TypeRegistry::load`], which follows element,
//! base and field types until the set is closed. Lookups during rendering are
//! synchronous and cheap ([`TypeRegistry::kind`]).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// OIDs below this were assigned when the server was built or by `initdb`;
/// objects created afterwards (user types) get OIDs from here up.
pub const FIRST_NORMAL_OID: u32 = 16384;

/// How a value of a type is rendered. See `proto-notes/values.md` for the rules
/// and the server behaviour they were checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeKind {
    /// `t`/`f` → `true`/`false`.
    Bool,
    /// int2, int4, int8: the number as is.
    Int,
    /// float4, float8: `NaN`/`Infinity`/`-Infinity` → strings; otherwise the
    /// number with its exponent expanded the way `numeric_in` does.
    Float,
    /// numeric: the digits as they are; `NaN`/`Infinity`/`-Infinity` → strings.
    Numeric,
    /// json: parsed and re-emitted the way jsonb stores it (last duplicate key
    /// wins, keys in jsonb order, numbers normalised).
    Json,
    /// jsonb: checked and copied as is.
    Jsonb,
    /// date: a string of the text (the ISO output already is what `to_jsonb` gives).
    Date,
    /// time: a string of the text.
    Time,
    /// timetz: a string of the text (`to_jsonb` does not reformat the offset).
    TimeTz,
    /// timestamp: a string, the space between date and time replaced by `T`.
    Timestamp,
    /// timestamptz: like [`TypeKind::Timestamp`], the offset written `+HH:MM`.
    TimestampTz,
    /// bytea: a string of the hex text `\x…`.
    Bytea,
    /// Anything rendered as a JSON string of its text output.
    String,
    /// An array: `{…}` literal whose elements follow the rule of `elem`;
    /// `delim` separates elements (`;` for box, `,` otherwise).
    Array { elem: u32, delim: u8 },
    /// int2vector / oidvector: space-separated elements of type `elem`,
    /// rendered as a JSON array (as `to_jsonb` does).
    Vector { elem: u32 },
    /// A composite (row) type: `(…)` literal → object.
    Composite(Composite),
    /// A domain: rendered as its base type.
    Domain { base: u32 },
}

/// The live (not dropped) attributes of a composite type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Composite {
    /// Attribute name and type OID, in attribute-number order (the order of the
    /// fields in the text literal).
    pub fields: Vec<(String, u32)>,
    /// Indexes into `fields` in the order jsonb sorts object keys (shorter
    /// first, then bytewise), which is the order `to_jsonb` writes them.
    pub key_order: Vec<usize>,
}

impl Composite {
    pub fn new(fields: Vec<(String, u32)>) -> Composite {
        let mut key_order: Vec<usize> = (0..fields.len()).collect();
        key_order.sort_by(|&a, &b| {
            let (ka, kb) = (fields[a].0.as_bytes(), fields[b].0.as_bytes());
            ka.len().cmp(&kb.len()).then_with(|| ka.cmp(kb))
        });
        Composite { fields, key_order }
    }
}

/// Multiplicative hashing for OIDs (the std SipHash is needlessly slow here).
#[derive(Default)]
pub struct OidHasher(u64);

impl Hasher for OidHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type OidMap<V> = HashMap<u32, V, BuildHasherDefault<OidHasher>>;

/// Type OID → [`TypeKind`].
#[derive(Debug, Clone)]
pub struct TypeRegistry {
    kinds: OidMap<TypeKind>,
    /// `format_type(oid, typmod)` of the columns of delivered relations,
    /// for `op:"schema"` events only (see [`TypeRegistry::load_names`]).
    names: HashMap<(u32, i32), Box<str>>,
}

/// Built-in scalar types whose rule is not [`TypeKind::String`].
const BUILTIN_SCALARS: &[(u32, TypeKind)] = &[
    (16, TypeKind::Bool),
    (17, TypeKind::Bytea),
    (20, TypeKind::Int),
    (21, TypeKind::Int),
    (23, TypeKind::Int),
    (114, TypeKind::Json),
    (700, TypeKind::Float),
    (701, TypeKind::Float),
    (1082, TypeKind::Date),
    (1083, TypeKind::Time),
    (1114, TypeKind::Timestamp),
    (1184, TypeKind::TimestampTz),
    (1266, TypeKind::TimeTz),
    (1700, TypeKind::Numeric),
    (3802, TypeKind::Jsonb),
    (22, TypeKind::Vector { elem: 21 }), // int2vector
    (30, TypeKind::Vector { elem: 26 }), // oidvector
];

/// Built-in base, range and multirange types rendered as a string of their text
/// (listed so that [`TypeRegistry::missing`] does not report them).
const BUILTIN_STRINGS: &[u32] = &[
    18,   // "char"
    19,   // name
    24,   // regproc
    25,   // text
    26,   // oid (to_jsonb gives a string: oid is not in its numeric category)
    27,   // tid
    28,   // xid
    29,   // cid
    142,  // xml
    194,  // pg_node_tree
    600,  // point
    601,  // lseg
    602,  // path
    603,  // box
    604,  // polygon
    628,  // line
    650,  // cidr
    718,  // circle
    774,  // macaddr8
    790,  // money
    829,  // macaddr
    869,  // inet
    1033, // aclitem
    1042, // bpchar
    1043, // varchar
    1186, // interval
    1560, // bit
    1562, // varbit
    1790, // refcursor
    2202, // regprocedure
    2203, // regoper
    2204, // regoperator
    2205, // regclass
    2206, // regtype
    2950, // uuid
    2970, // txid_snapshot
    3220, // pg_lsn
    3361, // pg_ndistinct
    3402, // pg_dependencies
    3614, // tsvector
    3615, // tsquery
    3642, // gtsvector
    3734, // regconfig
    3769, // regdictionary
    3904, // int4range
    3906, // numrange
    3908, // tsrange
    3910, // tstzrange
    3912, // daterange
    3926, // int8range
    4072, // jsonpath
    4089, // regnamespace
    4096, // regrole
    4191, // regcollation
    4451, // int4multirange
    4532, // nummultirange
    4533, // tsmultirange
    4534, // tstzmultirange
    4535, // datemultirange
    4536, // int8multirange
    4600, // pg_brin_bloom_summary
    4601, // pg_brin_minmax_multi_summary
    5017, // pg_mcv_list
    5038, // pg_snapshot
    5069, // xid8
];

/// Built-in array types: (array OID, element OID). Every element type uses `,`
/// as its array delimiter except box (603), which uses `;`.
const BUILTIN_ARRAYS: &[(u32, u32)] = &[
    (143, 142),   // _xml
    (199, 114),   // _json
    (271, 5069),  // _xid8
    (629, 628),   // _line
    (651, 650),   // _cidr
    (719, 718),   // _circle
    (775, 774),   // _macaddr8
    (791, 790),   // _money
    (1000, 16),   // _bool
    (1001, 17),   // _bytea
    (1002, 18),   // _char
    (1003, 19),   // _name
    (1005, 21),   // _int2
    (1006, 22),   // _int2vector
    (1007, 23),   // _int4
    (1008, 24),   // _regproc
    (1009, 25),   // _text
    (1010, 27),   // _tid
    (1011, 28),   // _xid
    (1012, 29),   // _cid
    (1013, 30),   // _oidvector
    (1014, 1042), // _bpchar
    (1015, 1043), // _varchar
    (1016, 20),   // _int8
    (1017, 600),  // _point
    (1018, 601),  // _lseg
    (1019, 602),  // _path
    (1020, 603),  // _box (delimiter ';')
    (1021, 700),  // _float4
    (1022, 701),  // _float8
    (1027, 604),  // _polygon
    (1028, 26),   // _oid
    (1034, 1033), // _aclitem
    (1040, 829),  // _macaddr
    (1041, 869),  // _inet
    (1115, 1114), // _timestamp
    (1182, 1082), // _date
    (1183, 1083), // _time
    (1185, 1184), // _timestamptz
    (1187, 1186), // _interval
    (1231, 1700), // _numeric
    (1270, 1266), // _timetz
    (1561, 1560), // _bit
    (1563, 1562), // _varbit
    (2201, 1790), // _refcursor
    (2207, 2202), // _regprocedure
    (2208, 2203), // _regoper
    (2209, 2204), // _regoperator
    (2210, 2205), // _regclass
    (2211, 2206), // _regtype
    (2949, 2970), // _txid_snapshot
    (2951, 2950), // _uuid
    (3221, 3220), // _pg_lsn
    (3643, 3614), // _tsvector
    (3644, 3642), // _gtsvector
    (3645, 3615), // _tsquery
    (3735, 3734), // _regconfig
    (3770, 3769), // _regdictionary
    (3807, 3802), // _jsonb
    (3905, 3904), // _int4range
    (3907, 3906), // _numrange
    (3909, 3908), // _tsrange
    (3911, 3910), // _tstzrange
    (3913, 3912), // _daterange
    (3927, 3926), // _int8range
    (4073, 4072), // _jsonpath
    (4090, 4089), // _regnamespace
    (4097, 4096), // _regrole
    (4192, 4191), // _regcollation
    (5039, 5038), // _pg_snapshot
    (6150, 4451), // _int4multirange
    (6151, 4532), // _nummultirange
    (6152, 4533), // _tsmultirange
    (6153, 4534), // _tstzmultirange
    (6155, 4535), // _datemultirange
    (6157, 4536), // _int8multirange
];

/// True when `oid` is in the static built-in table (such entries are never
/// replaced by [`TypeRegistry::load`]).
fn is_static_builtin(oid: u32) -> bool {
    BUILTIN_SCALARS.iter().any(|(o, _)| *o == oid)
        || BUILTIN_STRINGS.contains(&oid)
        || BUILTIN_ARRAYS.iter().any(|(o, _)| *o == oid)
}

/// The catalog query behind [`TypeRegistry::load`]: the requested types plus
/// everything they reach through `typelem`, `typbasetype` and composite
/// attributes. `true_array` mirrors the server's `IsTrueArrayType`
/// (`typsubscript = array_subscript_handler`; before version 14, which has no
/// `typsubscript`, a varlena with an element type).
const LOAD_SQL: &str = "\
WITH RECURSIVE closure(oid) AS (
    SELECT o FROM unnest($1::pg_catalog.oid[]) AS o
  UNION
    SELECT d.dep
    FROM closure c
    JOIN pg_catalog.pg_type t ON t.oid = c.oid
    CROSS JOIN LATERAL (
        SELECT t.typelem WHERE t.typelem <> 0
      UNION ALL
        SELECT t.typbasetype WHERE t.typbasetype <> 0
      UNION ALL
        SELECT a.atttypid FROM pg_catalog.pg_attribute a
        WHERE t.typrelid <> 0 AND a.attrelid = t.typrelid
          AND a.attnum > 0 AND NOT a.attisdropped
    ) AS d(dep)
)
SELECT t.oid,
       t.typtype::pg_catalog.text,
       t.typelem,
       t.typbasetype,
       t.typelem <> 0 AND COALESCE(
           (pg_catalog.to_jsonb(t) ->> 'typsubscript') = 'array_subscript_handler',
           t.typlen = -1) AS true_array,
       COALESCE(e.typdelim::pg_catalog.text, ','),
       ARRAY(SELECT a.attname::pg_catalog.text FROM pg_catalog.pg_attribute a
             WHERE t.typrelid <> 0 AND a.attrelid = t.typrelid
               AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum),
       ARRAY(SELECT a.atttypid FROM pg_catalog.pg_attribute a
             WHERE t.typrelid <> 0 AND a.attrelid = t.typrelid
               AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum)
FROM closure c
JOIN pg_catalog.pg_type t ON t.oid = c.oid
LEFT JOIN pg_catalog.pg_type e ON e.oid = t.typelem";

impl Default for TypeRegistry {
    fn default() -> Self {
        Self::builtin()
    }
}

impl TypeRegistry {
    /// A registry that knows the built-in types (fixed OIDs, same on every
    /// server version that has them).
    pub fn builtin() -> Self {
        let mut kinds = OidMap::default();
        for (oid, kind) in BUILTIN_SCALARS {
            kinds.insert(*oid, kind.clone());
        }
        for oid in BUILTIN_STRINGS {
            kinds.insert(*oid, TypeKind::String);
        }
        for &(oid, elem) in BUILTIN_ARRAYS {
            let delim = if elem == 603 { b';' } else { b',' };
            kinds.insert(oid, TypeKind::Array { elem, delim });
        }
        TypeRegistry {
            kinds,
            names: HashMap::new(),
        }
    }

    /// The name of type `oid` with modifier `type_mod`, as `format_type()`
    /// gave it at the last [`TypeRegistry::load_names`].
    pub fn name(&self, oid: u32, type_mod: i32) -> Option<Box<str>> {
        self.names.get(&(oid, type_mod)).cloned()
    }

    /// Asks the catalog for the names of `types` (type OID, modifier) in one
    /// query, replacing what was known (a type may have been renamed). Only
    /// schema events show them; a type that no longer exists keeps no name.
    pub async fn load_names(
        &mut self,
        client: &tokio_postgres::Client,
        types: &[(u32, i32)],
    ) -> Result<(), tokio_postgres::Error> {
        let (oids, mods): (Vec<u32>, Vec<i32>) = types.iter().copied().unzip();
        let rows = client
            .query(
                "SELECT t.o, t.m, pg_catalog.format_type(t.o, t.m) \
                 FROM unnest($1::pg_catalog.oid[], $2::pg_catalog.int4[]) AS t(o, m) \
                 JOIN pg_catalog.pg_type ty ON ty.oid = t.o",
                &[&oids, &mods],
            )
            .await?;
        for row in rows {
            let name: String = row.try_get(2)?;
            self.names
                .insert((row.try_get(0)?, row.try_get(1)?), name.into());
        }
        Ok(())
    }

    /// The rule for `oid`; `None` when the registry has not seen it (render then
    /// falls back to a string of the text).
    #[inline]
    pub fn kind(&self, oid: u32) -> Option<&TypeKind> {
        self.kinds.get(&oid)
    }

    /// True for the types of the static built-in table: their rule never
    /// changes, so a value that does not parse is not a stale registry.
    pub fn is_builtin(&self, oid: u32) -> bool {
        is_static_builtin(oid)
    }

    /// The loaded (non built-in) types among `oids`: what a refresh reloads.
    pub fn loaded(&self, oids: &[u32]) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for &oid in oids {
            if oid != 0 && !is_static_builtin(oid) && !out.contains(&oid) {
                out.push(oid);
            }
        }
        out
    }

    /// The composite types the registry holds (a rename of their attributes
    /// shows nowhere in the stream, so the session refreshes them now and then).
    pub fn composites(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .kinds
            .iter()
            .filter(|(_, k)| matches!(k, TypeKind::Composite(_)))
            .map(|(o, _)| *o)
            .collect();
        v.sort_unstable();
        v
    }

    /// Adds or replaces the rule for `oid` (built-in entries included).
    pub fn insert(&mut self, oid: u32, kind: TypeKind) {
        self.kinds.insert(oid, kind);
    }

    /// The OIDs in `oids` the registry does not know, each once, in first-seen
    /// order. These are user types (>= [`FIRST_NORMAL_OID`]) and the few
    /// `initdb`-created types outside the static table (system catalog row
    /// types, `information_schema` domains); both are worth a [`Self::load`].
    pub fn missing(&self, oids: &[u32]) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for &oid in oids {
            if oid != 0 && !self.kinds.contains_key(&oid) && !out.contains(&oid) {
                out.push(oid);
            }
        }
        out
    }

    /// Looks `oids` up in the catalog, with everything they depend on (element
    /// types of arrays, base types of domains, attribute types of composites,
    /// recursively), in one query. Entries from the static built-in table are
    /// kept; other entries are replaced, so calling this again after an
    /// `ALTER TYPE` refreshes them. OIDs that no longer exist stay unknown.
    pub async fn load(
        &mut self,
        client: &tokio_postgres::Client,
        oids: &[u32],
    ) -> Result<(), tokio_postgres::Error> {
        if oids.is_empty() {
            return Ok(());
        }
        let rows = client.query(LOAD_SQL, &[&oids]).await?;
        for row in rows {
            let oid: u32 = row.try_get(0)?;
            if is_static_builtin(oid) {
                continue;
            }
            let typtype: String = row.try_get(1)?;
            let typelem: u32 = row.try_get(2)?;
            let typbasetype: u32 = row.try_get(3)?;
            let true_array: bool = row.try_get(4)?;
            let delim: String = row.try_get(5)?;
            let names: Vec<String> = row.try_get(6)?;
            let field_types: Vec<u32> = row.try_get(7)?;
            let kind = match typtype.as_str() {
                "d" => TypeKind::Domain { base: typbasetype },
                "c" => TypeKind::Composite(Composite::new(
                    names.into_iter().zip(field_types).collect(),
                )),
                "b" if true_array => TypeKind::Array {
                    elem: typelem,
                    delim: delim.bytes().next().unwrap_or(b','),
                },
                // enums ('e'), ranges ('r'), multiranges ('m'), other base
                // types and pseudo-types: to_jsonb gives a string of the text.
                _ => TypeKind::String,
            };
            self.kinds.insert(oid, kind);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_arrays_and_delimiters() {
        let reg = TypeRegistry::builtin();
        assert_eq!(
            reg.kind(1007),
            Some(&TypeKind::Array {
                elem: 23,
                delim: b','
            })
        );
        assert_eq!(
            reg.kind(1020),
            Some(&TypeKind::Array {
                elem: 603,
                delim: b';'
            })
        );
        assert_eq!(reg.kind(26), Some(&TypeKind::String));
        assert_eq!(reg.kind(16), Some(&TypeKind::Bool));
        // Every array's element type is itself known.
        for &(_, elem) in BUILTIN_ARRAYS {
            assert!(reg.kind(elem).is_some(), "element {elem} unknown");
        }
    }

    #[test]
    fn missing_reports_unknown_once() {
        let reg = TypeRegistry::builtin();
        assert_eq!(
            reg.missing(&[23, 16385, 1007, 16385, 13221, 0]),
            vec![16385, 13221]
        );
    }

    #[test]
    fn composite_key_order_is_jsonb_order() {
        let c = Composite::new(vec![
            ("label".into(), 25),
            ("b".into(), 23),
            ("aa".into(), 23),
            ("a".into(), 23),
        ]);
        assert_eq!(c.key_order, vec![3, 1, 2, 0]);
    }
}
