//! The Redis sink: keeps one Redis key per row of the configured tables in
//! step with Postgres (a cache that follows the database, no dual writes).
//!
//! # Modes (per table)
//! - `json`: `SET key <row>`, the row exactly as the event's `after` object
//!   (`to_jsonb()`-exact values, columns in table order).
//! - `hash`: `HSET key column text …`: strings unescaped, other values their
//!   JSON text (`42`, `1.50`, `true`, `{"a": 1}`). A NULL column is absent
//!   from the hash (inserts and full updates replace the hash with `DEL` +
//!   `HSET`; a partial update `HDEL`s the columns that became NULL).
//! - `invalidate`: `DEL key` on any change (cache-aside; the application
//!   fills the cache from Postgres).
//!
//! Deletes `DEL` the key. A key change (an update whose old key differs,
//! from a `K` or `O` old row) deletes the old key and writes the new one.
//! `ttl_seconds` sets `EX` on every write.
//!
//! # Unchanged TOAST values
//! Postgres does not send a TOASTed value that an update did not change: the
//! column is absent from `after`, and a plain write would lose it. Such
//! updates run a Lua script (`merge_json.lua`, `merge_hash.lua`) that takes
//! the missing values from the stored row (at the old key when the key
//! changed too). In json mode the script never decodes JSON: Rust sends the
//! full new document cut at each missing value, and the script finds each
//! missing column's value *text* in the stored document with a small JSON
//! scanner and splices it in, so numbers (`1.50`, 40-digit numerics) and
//! strings stay byte-exact (cjson would round numbers). When the stored row
//! is missing (expired, evicted, never cached) the key is deleted rather than
//! written incomplete, and a warning counts it.
//!
//! # TRUNCATE
//! json and hash modes keep a per-table key set, `<state_prefix>:keys:<schema.table>`:
//! `SADD` on every write, `SREM` on delete, all in the same `MULTI` as the
//! write. TRUNCATE runs `truncate.lua`, which empties the set with `SPOP` in
//! slices and `UNLINK`s its members, atomically with the rest of the
//! transaction. This works for any template, costs one set member per
//! cached row, and never touches keys pgferry did not write. Members whose
//! key expired (TTL) are harmless: their `UNLINK` finds nothing.
//! In invalidate mode the application writes the keys, so no set can know
//! them: TRUNCATE `SCAN`s for the template's pattern (`product:*`), keeps the
//! keys whose shape the template can produce, and `UNLINK`s them, before the
//! transaction's `MULTI`. Hence invalidate mode requires a template that
//! starts with a literal prefix; give every table its own.
//!
//! # Atomicity
//! Commands are grouped into units. A unit is one `MULTI … EXEC`, sent in
//! one write with its replies read back together (pipelined: one round trip
//! per unit, not per event), so readers never see half a transaction. A unit
//! holds whole transactions, as many as fit in about 1 MiB / 4096 commands
//! (more small transactions may land together). A transaction larger than
//! 8 MiB / 32768 commands is split into several units of that size, each
//! atomic: readers may then see such a transaction partly applied, until its
//! last unit lands. Memory stays bounded: spilled transactions are read from
//! disk on a blocking thread and handed over one unit at a time.
//!
//! # Delivery: effectively-once final state
//! Every unit ends with `SET <state_prefix>:position <position>`, inside
//! the same `MULTI`: Redis itself records how far it has applied the
//! stream (all transactions committed before a `commit_lsn`, and the first
//! `n` changes of that one), and whose stream that is (server, database,
//! slot: see [`position`]). A position of another stream stops the sink. The sink reads the position at start and after any
//! failure, and skips what Redis already holds. So the transactions that a
//! crash replays (applied to Redis, not yet checkpointed) are not applied
//! twice, and a split transaction resumes after its last applied unit. An
//! `EXEC` whose reply was lost (timeout, broken connection) either ran
//! entirely or not at all, and the position tells which.
//!
//! This matters because replays are not harmless in general: plain `SET`,
//! `DEL` and `HSET` replayed in order from a transaction boundary do end in
//! the same state (each key's last write wins, and a key's later writes are
//! replayed too), but a merge reads the current value, and after a replay
//! that value may be from a later generation of the row (e.g. id 1 moved to
//! 10, then a new id 1 inserted: replaying the move would copy the new row's
//! body). With the position, Redis sees each command once; commands may
//! still be *sent* more than once (at-least-once on the wire).
//!
//! Commit LSNs only grow within one cluster's history: after pointing the
//! sink at another cluster or restoring Postgres to an earlier point in
//! time, the position key must be deleted (documented for operators).
//!
//! If Redis loses its data (restart without persistence, `FLUSHALL`), the
//! position goes too: pgferry warns, and the cache is rebuilt by the changes
//! that follow. pgferry has no snapshot: rows that do not change stay
//! uncached (json/hash readers should fall back to Postgres on a miss).
//!
//! # Errors
//! - Transient (retried with backoff, the batch is replayed, the position
//!   decides what is left): connection refused/reset, timeouts, TLS
//!   handshake failures, `LOADING`, `BUSY`, `OOM`, `READONLY` (failover),
//!   `MISCONF`, a transaction refused as a whole (`EXECABORT` for one of
//!   those reasons).
//! - Fatal (replaying cannot help; pgferry stops with guidance): bad
//!   credentials or ACL permissions, a key template that names a missing
//!   or non-key column, and a command failing inside `EXEC` (`WRONGTYPE`: a
//!   key pgferry writes holds another type, or a script error). Redis has no
//!   rollback, so the unit's other commands ran: the sink resets the
//!   position key to before the unit, so that it is applied again after the
//!   operator fixes the key and restarts.
//!
//! Keys: pgferry owns the keys its templates produce and those under
//! `state_prefix` (default `pgferry:<slot>:<sink name>`). Two tables' key
//! templates that could produce the same key are refused at load. Standalone Redis (or a
//! primary reached through one address) only: the multi-key `MULTI` and
//! scripts are not Redis Cluster-aware. Redis 6.2 or later.

mod commands;
mod config;
pub mod position;
mod sink;

pub use config::{Mode, RedisConfig, RedisTableConfig};
pub use sink::RedisSink;
