-- pgferry DDL capture (issue 15): an event trigger that writes each DDL
-- command into the WAL as a transactional logical message, prefix
-- 'pgferry.ddl', at its exact place in its transaction. pgferry turns the
-- messages that name a table of `source.tables` into `op:"ddl"` events
-- (JSONL sink). Without this trigger everything else works the same, from
-- pgoutput's Relation messages.
--
-- Install as a superuser (event triggers need it), in the database pgferry
-- reads:   psql -d DB -f sql/capture_ddl.sql
-- Remove:  DROP EVENT TRIGGER pgferry_ddl_end; DROP EVENT TRIGGER pgferry_ddl_drop;
--          DROP FUNCTION pgferry_capture_ddl(); DROP FUNCTION pgferry_capture_drop();
--
-- Message: {"tag": "ALTER TABLE", "statement": "...", "objects":
--           [{"type": "table", "identity": "public.t", "oid": 16384,
--             "schema": "public", "name": "t"}]}

CREATE OR REPLACE FUNCTION pgferry_capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
  objs jsonb;
BEGIN
  SELECT coalesce(jsonb_agg(jsonb_build_object(
           'type', c.object_type, 'identity', c.object_identity, 'oid', c.objid::bigint,
           'schema', c.schema_name,
           'name', (SELECT relname FROM pg_catalog.pg_class WHERE oid = c.objid
                    AND c.classid = 'pg_catalog.pg_class'::regclass))), '[]'::jsonb)
    INTO objs
    FROM pg_catalog.pg_event_trigger_ddl_commands() c;
  PERFORM pg_catalog.pg_logical_emit_message(true, 'pgferry.ddl',
    jsonb_build_object('tag', tg_tag, 'statement', current_query(), 'objects', objs)::text);
END $$;

CREATE OR REPLACE FUNCTION pgferry_capture_drop() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
  objs jsonb;
BEGIN
  SELECT coalesce(jsonb_agg(jsonb_build_object(
           'type', d.object_type, 'identity', d.object_identity, 'oid', d.objid::bigint,
           'schema', d.schema_name, 'name', d.object_name)), '[]'::jsonb)
    INTO objs
    FROM pg_catalog.pg_event_trigger_dropped_objects() d
   WHERE d.object_type = 'table';
  PERFORM pg_catalog.pg_logical_emit_message(true, 'pgferry.ddl',
    jsonb_build_object('tag', tg_tag, 'statement', current_query(), 'objects', objs)::text);
END $$;

DROP EVENT TRIGGER IF EXISTS pgferry_ddl_end;
CREATE EVENT TRIGGER pgferry_ddl_end ON ddl_command_end EXECUTE FUNCTION pgferry_capture_ddl();
DROP EVENT TRIGGER IF EXISTS pgferry_ddl_drop;
CREATE EVENT TRIGGER pgferry_ddl_drop ON sql_drop EXECUTE FUNCTION pgferry_capture_drop();
