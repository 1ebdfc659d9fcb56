//! A table with one column per kind of value pgferry renders, and rows full of
//! edge values. Self-contained SQL: run [`SETUP_SQL`] then [`ROWS_SQL`] in the
//! `postgres` database (each as one simple-query batch, e.g. `psql -c` or
//! `batch_execute`). Used by the value-fidelity test and meant for the
//! end-to-end replication test too (rows have ids 1..=ROW_COUNT).

/// Types and the `public.all_types` table.
pub const SETUP_SQL: &str = r##"
CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy', 'so "so"', 'with space', 'a,b', 'back\slash');
CREATE DOMAIN public.posint AS int4 CHECK (VALUE > 0);
CREATE DOMAIN public.jdom AS json;
CREATE DOMAIN public.intlist AS int4[];
CREATE DOMAIN public.boxdom AS box;
CREATE TYPE public.floatrange AS RANGE (subtype = float8);
CREATE TYPE public.inner_t AS (n int4, t text);
CREATE TYPE public.pair AS (
    label text,
    num numeric,
    at timestamptz,
    tags text[],
    inner_v public.inner_t,
    m public.mood,
    j jsonb,
    d public.posint,
    "Weird ""Key"", too" bool,
    f float8,
    js json
);
CREATE TYPE public.dropped_t AS (a int4, b text, c int4);
ALTER TYPE public.dropped_t DROP ATTRIBUTE b;

CREATE TABLE public.all_types (
    id int PRIMARY KEY,
    c_bool bool,
    c_int2 int2,
    c_int4 int4,
    c_int8 int8,
    c_oid oid,
    c_float4 float4,
    c_float8 float8,
    c_numeric numeric,
    c_numeric_scaled numeric(20, 4),
    c_json json,
    c_jsonb jsonb,
    c_text text,
    c_varchar varchar(40),
    c_bpchar char(6),
    c_name name,
    c_char "char",
    c_uuid uuid,
    c_mood public.mood,
    c_inet inet,
    c_cidr cidr,
    c_macaddr macaddr,
    c_macaddr8 macaddr8,
    c_money money,
    c_interval interval,
    c_int4range int4range,
    c_tstzrange tstzrange,
    c_floatrange public.floatrange,
    c_int4multirange int4multirange,
    c_xml xml,
    c_bit bit(4),
    c_varbit varbit,
    c_tsvector tsvector,
    c_tsquery tsquery,
    c_point point,
    c_line line,
    c_lseg lseg,
    c_box box,
    c_path path,
    c_polygon polygon,
    c_circle circle,
    c_bytea bytea,
    c_date date,
    c_time time,
    c_timetz timetz,
    c_timestamp timestamp,
    c_timestamptz timestamptz,
    c_pg_lsn pg_lsn,
    c_jsonpath jsonpath,
    c_int2vector int2vector,
    c_oidvector oidvector,
    c_posint public.posint,
    c_jdom public.jdom,
    c_intlist public.intlist,
    c_pair public.pair,
    c_dropped public.dropped_t,
    a_int4 int4[],
    a_text text[],
    a_int4_2d int4[][],
    a_numeric numeric[],
    a_float8 float8[],
    a_float4 float4[],
    a_timestamptz timestamptz[],
    a_timestamp timestamp[],
    a_date date[],
    a_json json[],
    a_jsonb jsonb[],
    a_pair public.pair[],
    a_mood public.mood[],
    a_box box[],
    a_boxdom public.boxdom[],
    a_bool bool[],
    a_bytea bytea[],
    a_bpchar char(3)[],
    a_posint public.posint[],
    a_int2vector int2vector[],
    a_uuid uuid[],
    a_interval interval[],
    a_int4range int4range[],
    a_timetz timetz[]
);
"##;

/// Number of rows [`ROWS_SQL`] inserts (ids 1..=ROW_COUNT).
pub const ROW_COUNT: i32 = 6;

/// The rows: 1 ordinary values, 2 all NULL, 3 awkward text, 4 and 5 special
/// and extreme numbers / dates, 6 empty and offset arrays, NULL elements.
pub const ROWS_SQL: &str = r##"
INSERT INTO public.all_types VALUES (
    1, true, -32768, 2147483647, -9223372036854775808, 4294967295,
    1.5, 3.141592653589793, 12345678901234567890.123456789, 1.5,
    '{"b": 1, "a": [1, 2.50, "x"], "a": {"dup": true}}',
    '{"z": 1, "a": [1.0, "é"], "": null}',
    'hello, world', 'varchar', 'ab', 'a_name', 'x',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy',
    '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05',
    12.34, '1 year 2 mons 3 days 04:05:06.789',
    '[1,10)', '[2020-01-01 00:00+00,2020-02-01 00:00+00)', '[1.5,2.5]', '{[1,3),[5,7)}',
    '<a b="c">d</a>', B'1010', B'101', 'a fat cat', 'fat & cat',
    '(1.5,2)', '{1,2,3}', '[(0,0),(1,1)]', '(1,1),(0,0)', '[(0,0),(1,1),(2,0)]',
    '((0,0),(1,1),(1,0))', '<(0,0),1>',
    '\x00ff10', '2020-01-01', '12:34:56.789', '12:34:56+05:30',
    '2020-01-01 12:00:00.123', '2020-01-01 12:00:00.123456+02',
    '16/B374D848', '$.a[*] ? (@ > 1)', '1 2 3', '23 25',
    42, '{"k": [1e2, 1.5E-3]}', '{1,2,3}',
    ROW('label', 1.50, '2020-01-01 00:00+00', ARRAY['a', 'b c'], ROW(1, 'x'), 'ok',
        '{"j": 1}', 7, true, 1e100, '{"y":2,"x":1}')::public.pair,
    ROW(1, 3)::public.dropped_t,
    '{1,2,3}', '{a,"b c","d,e"}', '{{1,2},{3,4}}', '{1.50,-0.001,NaN,Infinity}',
    '{1.5,1e100,1e-7,NaN,Infinity,-Infinity,-0}', '{1.5,3.4028235e38,-0}',
    '{"2020-01-01 00:00:00+00",infinity,"0044-03-15 12:00:00 BC"}',
    '{"2020-01-01 12:00:00.5",-infinity}', '{2020-01-01,infinity,"0001-01-01 BC"}',
    ARRAY['{"b":1,"a":2,"b":3}', '[1, 2]', '"s"', 'null', '1e3']::json[],
    ARRAY['{"b":1,"a":2}', '3', '"q\"uote"']::jsonb[],
    ARRAY[ROW('in array', 2, NULL, ARRAY['x', NULL], ROW(NULL, NULL), 'a,b',
              '[1]', 1, false, -0, '[]')::public.pair, NULL],
    '{sad,happy,"so \"so\"","with space","a,b","back\\slash"}',
    ARRAY['(1,1),(0,0)'::box, '(3,3),(2,2)'::box], ARRAY['(5,5),(4,4)'::box]::public.boxdom[],
    '{t,f,NULL}', ARRAY['\x00'::bytea, '\xdeadbeef'::bytea, '\x'::bytea, NULL],
    '{a,bb,""}', '{1,2}', ARRAY['1 2'::int2vector, '3'::int2vector],
    '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}', '{"1 day","-00:00:01"}', '{"[1,2)",empty}',
    '{12:00:00+01,"13:00:00-03:30"}'
);

INSERT INTO public.all_types (id) VALUES (2);

INSERT INTO public.all_types (id, c_text, c_varchar, c_bpchar, c_name, c_char, c_mood, c_json, c_jsonb,
                              c_xml, c_pair, a_text, a_pair, a_mood, a_json, a_jsonb, a_bpchar, c_jdom,
                              c_tsvector, c_bytea)
VALUES (
    3,
    E'quote " backslash \\ comma , braces {} parens () semicolon ; newline \n tab \t cr \r bell \x07 esc \x1b unicode é 日本 😀 del \x7f slash /',
    'NULL', '', 'na"me\', '"', 'so "so"',
    '  [1e2, -0, -0.0, 0.10, 1E+2, 0.001e2, 12.5e-1, "\u00e9\ud83d\ude00\/\n\u001f", {"": 1, "bb": 2, "a": 3, "é": 4}, true, false, null]  ',
    '"just a string with \"quotes\" and \\ and \u0001"',
    '<t>&lt;"x"&gt; é</t>',
    ROW(E'a "quoted" \\ label, with (parens) and\nnewline', -0.00, '2020-06-01 12:00+00',
        ARRAY['', 'NULL', NULL, E'b\\s', 'q"t', '{x}'], ROW(-1, ''), 'so "so"',
        '{"k": "v \" \\ "}', 1, NULL, 'NaN', ' {"a" : [ "x\"y" ] } ')::public.pair,
    ARRAY['quote " x', E'back\\slash', '{braces}', 'NULL', NULL, '', '  spaces  ', 'comma,here',
          'é日本', E'new\nline', E'tab\t', 'semi;colon'],
    ARRAY[ROW(E'x"y\\z', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::public.pair,
          ROW(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::public.pair],
    ARRAY['with space', 'back\slash', 'so "so"']::public.mood[],
    ARRAY[E'{"a": "\\u00e9 \\"x\\" \\\\"}', E' { "s" : "a,b}" } ']::json[],
    ARRAY['{"a": "{x,y}", "b": "(1,2)"}', '"NULL"', 'null']::jsonb[],
    ARRAY['"', '\', ' a ', '{'],
    '{"z": {"y": [{}, []]}, "a": -1.0E-2}',
    E'''it''s'' "q" \\x', '\x'
);

INSERT INTO public.all_types (id, c_float4, c_float8, c_numeric, c_numeric_scaled, c_date, c_time, c_timetz,
                              c_timestamp, c_timestamptz, c_interval, c_money, c_int2, c_int4, c_int8, c_oid,
                              c_bool, c_json, a_float8, a_numeric, a_timestamptz)
VALUES (
    4, 'NaN', 'NaN', 'NaN', 0, 'infinity', '24:00:00', '12:34:56+05:30:15',
    'infinity', 'infinity', '-1 years -2 mons +3 days -04:05:06', -12.34, 32767, -2147483648,
    9223372036854775807, 0, false, '1.5e300',
    '{1e-300,5e-324,1.7976931348623157e308,-1.5e-7,123456789.125}',
    '{0.000000,-0.0,100.000,1e-20,-Infinity}',
    '{"0044-03-15 12:00:00.5+00 BC","294276-12-31 23:59:59.999999+00",-infinity}'
);

INSERT INTO public.all_types (id, c_float4, c_float8, c_numeric, c_numeric_scaled, c_date, c_time, c_timetz,
                              c_timestamp, c_timestamptz, c_interval, c_json, c_jsonb, c_int4range)
VALUES (
    5, '-Infinity', '-0', '-Infinity', -0.00005, '4713-01-01 BC', '00:00:00.000001', '00:00:00-14',
    '4713-01-01 00:00:00 BC', '-infinity', '178000000 years', '-0.0e5', '-0', 'empty'
), (
    6, '3.4028235e38', '1e-300', 'Infinity', 99999999.9999, '5874897-12-31', '23:59:59.999999',
    '23:59:59.999999+14:59', '294276-12-31 23:59:59.999999', '0044-03-15 12:00:00.5+00 BC', '0',
    '"\ud83d\ude00"', '[[[{"a": [[]]}]]]', '(,5]'
);

UPDATE public.all_types SET
    c_float8 = '1e+100', c_float4 = '1e-45',
    a_int4 = '[0:2]={1,2,3}', a_int4_2d = '[-1:0][1:2]={{1,NULL},{3,4}}', a_text = '[5:5]={x}',
    a_numeric = '{}', a_float8 = '{NULL}', a_json = '{}', a_jsonb = '{}', a_pair = '{}',
    a_mood = '{}', a_box = '{}', a_bool = '{NULL,NULL}', a_date = '[2:3]={infinity,-infinity}',
    a_timestamp = '{"4713-01-01 00:00:00 BC",infinity}', a_posint = '{}', a_int2vector = '{""}',
    a_interval = '{}', c_int2vector = '', c_oidvector = '', c_intlist = '{}',
    c_pair = ROW(NULL, NULL, NULL, '{}', NULL, NULL, 'null', NULL, NULL, '-Infinity', 'null')::public.pair,
    c_dropped = ROW(NULL, NULL)::public.dropped_t
WHERE id = 6;
"##;
