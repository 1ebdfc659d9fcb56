//! The position key, `<state_prefix>:position`: how far Redis has applied
//! the stream, and whose stream it is.
//!
//! Stored as JSON, written in the same `MULTI` as the data it covers:
//! `{"commit":"0/1F4","changes":20,"system":"7301…","database":"app","slot":"pgferry"}`.
//! The owner (server system identifier, database, slot) makes a shared
//! position impossible to trust by mistake: two pgferry instances with the
//! same `state_prefix` would otherwise skip each other's changes as
//! "already applied". A position of another owner stops the sink.
//!
//! pgferry before owners wrote `"<commit_lsn> <n>"`, and escaped more
//! characters in keys (every character of the template's text, where this
//! version escapes only separators: see `sink::key`), so its keys may differ
//! from the ones written now. Such a position stops the sink with the steps
//! to re-load the cache ([`OLDER_VERSION`]) rather than mixing both.

use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;
use crate::sink::StreamOwner;

/// How far Redis has applied the stream: every transaction committed before
/// `commit`, and the first `changes` changes of the one committed at `commit`
/// (counting every change of the transaction, in WAL order, whatever its table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub commit: Lsn,
    pub changes: u64,
}

/// What a position key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Written by this version: the position and its owner.
    Owned(Position, StreamOwner),
    /// Written by a pgferry that did not record owners.
    Unowned(Position),
}

#[derive(Serialize, Deserialize)]
struct Record {
    commit: String,
    changes: u64,
    system: String,
    database: String,
    slot: String,
}

/// What to do about a position an older pgferry wrote (the end of a sentence).
pub const OLDER_VERSION: &str = "whose keys escaped more characters than this version's (s1:{id} gave s1:%31 for id 1, now s1:1), \
     so keeping its keys would leave stale ones beside the new ones. Re-load the cache: stop pgferry, delete the tables' keys and \
     pgferry's keys under the old prefix (redis-cli --scan --pattern '<prefix>:*' | xargs redis-cli del), start pgferry, \
     then pgferry backfill --table <table> for each table (invalidate mode: make the application compute keys the new way first)";

/// `<prefix>:position`.
pub fn position_key(prefix: &str) -> String {
    format!("{prefix}:position")
}

/// The value written to the position key.
pub fn encode(p: Position, owner: &StreamOwner) -> String {
    let r = Record {
        commit: p.commit.to_string(),
        changes: p.changes,
        system: owner.system_identifier.clone(),
        database: owner.database.clone(),
        slot: owner.slot.clone(),
    };
    serde_json::to_string(&r).unwrap_or_default()
}

/// Reads a position key's value; `None`: not a pgferry position.
pub fn decode(text: &str) -> Option<Stored> {
    if let Ok(r) = serde_json::from_str::<Record>(text) {
        let p = Position {
            commit: r.commit.parse().ok()?,
            changes: r.changes,
        };
        return Some(Stored::Owned(
            p,
            StreamOwner {
                system_identifier: r.system,
                database: r.database,
                slot: r.slot,
            },
        ));
    }
    let (lsn, n) = text.split_once(' ')?;
    Some(Stored::Unowned(Position {
        commit: lsn.parse().ok()?,
        changes: n.parse().ok()?,
    }))
}

/// Why a stored position is not ours to use, for the operator; `None` when
/// it is (ours, or unowned).
pub fn foreign_owner(key: &str, stored: &Stored, ours: &StreamOwner) -> Option<String> {
    let Stored::Owned(_, owner) = stored else {
        return None;
    };
    (owner != ours).then(|| {
        format!(
            "Redis key {key:?} holds the position of another pgferry stream (slot {:?} of database {:?} on server {}), not this one's \
             (slot {:?} of database {:?} on server {}). Trusting it would skip changes that stream applied as if they were this one's. \
             Two pgferry instances share one state_prefix: give each sink its own (the default, pgferry:<slot>:<sink name>, is unique per slot). \
             If this pgferry now follows another server or database on purpose, delete the key (and re-load the cache) before starting it",
            owner.slot, owner.database, owner.system_identifier, ours.slot, ours.database, ours.system_identifier
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(slot: &str) -> StreamOwner {
        StreamOwner {
            system_identifier: "7301".into(),
            database: "app db".into(),
            slot: slot.into(),
        }
    }

    #[test]
    fn positions_round_trip_with_their_owner_and_old_ones_are_unowned() {
        let p = Position {
            commit: Lsn(0x1F4),
            changes: 20,
        };
        let text = encode(p, &owner("a"));
        assert_eq!(decode(&text), Some(Stored::Owned(p, owner("a"))));
        assert_eq!(decode("0/1F4 20"), Some(Stored::Unowned(p)));
        assert_eq!(decode("hello"), None);
        let stored = decode(&text).unwrap();
        assert_eq!(foreign_owner("k", &stored, &owner("a")), None);
        let why = foreign_owner("k", &stored, &owner("b")).unwrap();
        assert!(
            why.contains("\"a\"") && why.contains("state_prefix"),
            "{why}"
        );
        assert_eq!(foreign_owner("k", &Stored::Unowned(p), &owner("b")), None);
        // Positions order by commit, then by changes applied in it.
        let at = |c, n| Position {
            commit: Lsn(c),
            changes: n,
        };
        assert!(at(5, 100) < at(6, 0) && at(6, 1) < at(6, 2));
    }
}
