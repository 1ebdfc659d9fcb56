-- Edge values for the binary-values experiment (src/decode/binary.rs): pgferry's
-- JSON for each row, with `binary 'true'`, must equal to_jsonb(row).
CREATE TABLE bfid (id int PRIMARY KEY, i2 int2, i4 int4, i8 int8, b bool, t text, vc varchar(10),
  bp char(5), nm name, n numeric, n2 numeric(10,2), ts timestamp, tstz timestamptz, j json, jb jsonb,
  ta text[], ia int4[], na numeric[], tsa timestamptz[], ja jsonb[]);
CREATE PUBLICATION bfidpub FOR TABLE bfid;
SELECT count(pg_create_logical_replication_slot('bfid', 'pgoutput'));
INSERT INTO bfid VALUES
 (1, -32768, -2147483648, -9223372036854775808, true, '', 'ab', 'ab', 'name', 'NaN', 0, 'infinity', '-infinity',
  '{"b":1,"a":[1,2.50,{"x":null}],"a":3}', '{"z": 1, "a": "ü", "n": 1.50}',
  '{}', '{1,NULL,-3}', '{1.50,NaN,-0.001}', '{infinity,"2026-01-01 00:00:00+00"}', ARRAY['{"a":1}'::jsonb, NULL]),
 (2, 32767, 2147483647, 9223372036854775807, false, E'a"b\\c\ttab\nnl ünïcødé 😀', 'x y', 'abcde', 'n"m', 'Infinity', -12.5,
  '-infinity', 'infinity', '[]', 'null', '{NULL,"a b","x,y","{q}","",NULL}', '{}', '{}', '{}', '{}'),
 (3, 0, 0, 0, NULL, 'NULL', NULL, NULL, NULL, '-Infinity', 99999999.99, '2026-11-26 10:02:03.123456',
  '2026-06-01 12:00:00.5+05:30', '"s"', '"s"', '{{a,b},{c,d}}', '[0:2]={7,8,9}', '{{1,2},{3,4}}', NULL, NULL),
 (4, 1, 1, 1, true, 't', 't', 't', 't', 0, 0.01, '0001-01-01 00:00:00 BC', '0001-01-01 00:00:00+00 BC',
  '1e400', '1.0e-5', '[0:1]={a,b}', NULL, '{0.00}', '{-infinity}', NULL),
 (5, -1, -1, -1, false, 'x', 'x', 'x', 'x', -0.001, -0.01, '1999-12-31 23:59:59.999999', '1970-01-01 00:00:00+00',
  '{}', '{}', '{x}', '{-2147483648}', '{123456789012345678901234567890.123456789}', '{"1999-12-31 23:59:59.999999+00"}', NULL),
 (6, 2, 2, 2, true, 'y', 'y', 'y', 'y', 123456789012345678901234567890.123456789, 1, '294276-12-31 23:59:59.999999',
  '4714-11-24 00:00:00+00 BC', 'true', 'false', NULL, NULL, NULL, NULL, NULL),
 (7, 3, 3, 3, true, 'z', 'z', 'z', 'z', 1e-20, 2, '2000-02-29 00:00:00', '2024-02-29 23:59:59.000001+00',
  '{"a":{"b":[true,false,null]}}', '[1, [2, [3]]]', '{a}', '{5}', '{1e-20,-10000,10000,0.5}', NULL, NULL),
 (8, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
