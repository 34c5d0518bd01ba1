//! Repack lineage (`lineage/<id>`): where an admin prune moved data that snapshots' public pack
//! lists still place in packs it deleted, so a keyless server can garbage-collect safely.

use crate::id::{Id, IdMap, IdSet, hex_id, hex_ids};
use kura_store::{Kind, ObjectName, Store, StoreError};
use serde::{Deserialize, Serialize};

/// One move: the used blobs that were in `from` now live in the packs `to` (none: `from` was
/// deleted with nothing in it that a snapshot used).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Edge {
    /// A pack a prune deleted (or will delete).
    #[serde(with = "hex_id")]
    pub from: Id,
    /// Packs holding the kept copies of the used blobs `from` held, sorted.
    #[serde(with = "hex_ids")]
    pub to: Vec<Id>,
}

/// The stored record (plain JSON: the storage reads it without the key).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// Record version (1).
    pub version: u32,
    /// When it was written (RFC 3339, the pruning host's clock; informational).
    pub created: String,
    /// Moves, sorted by `from`.
    pub edges: Vec<Edge>,
}

impl Lineage {
    /// A record of `edges` (merged per source pack, sorted). An edge to nothing records a pack
    /// deleted with no used data in it.
    pub fn new(edges: &IdMap<IdSet>) -> Lineage {
        let mut v: Vec<Edge> = edges
            .iter()
            .map(|(from, to)| {
                let mut to: Vec<Id> = to.iter().copied().collect();
                to.sort();
                Edge { from: *from, to }
            })
            .collect();
        v.sort_by_key(|e| e.from);
        Lineage { version: 1, created: jiff::Timestamp::now().to_string(), edges: v }
    }

    /// Stored form.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a stored record.
    pub fn decode(bytes: &[u8]) -> Result<Lineage, String> {
        let l: Lineage = serde_json::from_slice(bytes).map_err(|e| format!("not a lineage record: {e}"))?;
        if l.version != 1 {
            return Err(format!("lineage record version {} is not supported", l.version));
        }
        Ok(l)
    }

    /// Adds this record's moves to `into`.
    pub fn merge_into(&self, into: &mut IdMap<IdSet>) {
        for e in &self.edges {
            into.entry(e.from).or_default().extend(e.to.iter().copied());
        }
    }
}

/// Every lineage object of a repository, read.
#[derive(Debug, Default)]
pub struct Records {
    /// The readable objects' ids.
    pub ids: Vec<Id>,
    /// Their moves, merged.
    pub edges: IdMap<IdSet>,
    /// One message per unreadable object (damaged or not a record): nobody may then rely on
    /// the moves being complete.
    pub problems: Vec<String>,
}

/// Reads every lineage object.
pub fn read_all(store: &dyn Store) -> Result<Records, StoreError> {
    let mut ids = Vec::new();
    let mut edges = IdMap::default();
    let mut problems = Vec::new();
    for l in store.list(Kind::Lineage)? {
        let obj = ObjectName::new(Kind::Lineage, &l.name);
        let bytes = match store.get(Kind::Lineage, &l.name) {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        let id = Id::of_stored(&bytes);
        if id.to_hex() != l.name {
            problems.push(format!("{obj}: content does not match its name"));
            continue;
        }
        match Lineage::decode(&bytes) {
            Ok(rec) => {
                rec.merge_into(&mut edges);
                ids.push(id);
            }
            Err(e) => problems.push(format!("{obj}: {e}")),
        }
    }
    Ok(Records { ids, edges, problems })
}

/// Every pack reachable from `roots` by following moves: where the data of packs named in
/// public lists may live now.
pub fn closure(roots: impl IntoIterator<Item = Id>, edges: &IdMap<IdSet>) -> IdSet {
    let mut seen = IdSet::default();
    let mut stack: Vec<Id> = roots.into_iter().collect();
    while let Some(p) = stack.pop() {
        if seen.insert(p)
            && let Some(to) = edges.get(&p)
        {
            stack.extend(to.iter().copied());
        }
    }
    seen
}

/// Only the moves reachable from `roots`: the others lead away from packs no snapshot names.
pub fn reachable_edges(roots: impl IntoIterator<Item = Id>, edges: &IdMap<IdSet>) -> IdMap<IdSet> {
    let reach = closure(roots, edges);
    edges.iter().filter(|(from, _)| reach.contains(*from)).map(|(f, t)| (*f, t.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> Id {
        Id([b; 32])
    }

    fn map(pairs: &[(u8, &[u8])]) -> IdMap<IdSet> {
        pairs.iter().map(|(f, t)| (id(*f), t.iter().map(|b| id(*b)).collect())).collect()
    }

    #[test]
    fn closure_follows_chains_and_cycles() {
        let e = map(&[(1, &[2]), (2, &[3, 4]), (4, &[1]), (9, &[8])]);
        let c = closure([id(1)], &e);
        assert_eq!(c.len(), 4);
        assert!(!c.contains(&id(8)));
        let r = reachable_edges([id(2)], &e);
        assert!(r.contains_key(&id(2)) && r.contains_key(&id(4)) && r.contains_key(&id(1)));
        assert!(!r.contains_key(&id(9)));
    }

    #[test]
    fn round_trip_and_refusals() {
        let l = Lineage::new(&map(&[(5, &[7, 6]), (3, &[])]));
        assert_eq!(l.edges.len(), 2);
        assert!(l.edges[0].to.is_empty());
        assert_eq!(l.edges[1].to, vec![id(6), id(7)]);
        assert_eq!(Lineage::decode(&l.encode()).unwrap(), l);
        assert!(Lineage::decode(b"{}").is_err());
        let mut v2 = l.clone();
        v2.version = 2;
        assert!(Lineage::decode(&v2.encode()).is_err());
    }
}
