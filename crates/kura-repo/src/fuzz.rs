//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz, nightly) and their stable proptest
//! twins below, which CI runs: every decoder of stored bytes gets arbitrary input and must return
//! an error, never panic.

use crate::crypto::MasterKey;

fn key() -> MasterKey {
    MasterKey::from_secret([0x5a; 32])
}

/// Feeds bytes to the tree decoder.
pub fn decode_tree(data: &[u8]) {
    let _ = crate::tree::Tree::decode(data);
}

/// Feeds bytes to the snapshot decoders (public part and full, with a fixed key).
pub fn decode_snapshot(data: &[u8]) {
    let _ = crate::snapshot::decode_public(data);
    let _ = crate::snapshot::Snapshot::decode(&key(), data);
}

/// Feeds bytes to the index file decoder.
pub fn decode_index(data: &[u8]) {
    let _ = crate::index::IndexFile::decode(&key(), data);
}

/// Feeds bytes to the pack footer and header parsers.
pub fn decode_pack(data: &[u8]) {
    let _ = crate::pack::read_header(&key(), data);
    if data.len() >= crate::pack::FOOTER_LEN {
        let _ = crate::pack::parse_footer(&data[data.len() - crate::pack::FOOTER_LEN..], data.len() as u64);
    }
}

/// Feeds bytes to the key file, config, drill record and receipt parsers.
pub fn decode_json_records(data: &[u8]) {
    let _ = crate::keyfile::KeyFile::decode(data);
    let _ = crate::config::Config::decode(data);
    let _ = crate::drill::DrillRecord::decode(data);
    let _ = crate::receipt::Receipt::decode(data);
}

/// Feeds bytes to the prune plan decoder and the session record parser.
pub fn decode_plan(data: &[u8]) {
    let _ = crate::plan::PrunePlan::decode(&key(), data);
    let _ = crate::lineage::Lineage::decode(data);
    if let Ok(info) = serde_json::from_slice::<crate::session::SessionInfo>(data) {
        let _ = info.liveness(jiff::Timestamp::UNIX_EPOCH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Random bytes, and random bytes behind each record's real magic, so the decoders get past
    /// their first check.
    fn inputs() -> impl Strategy<Value = Vec<u8>> {
        let prefixes: Vec<&'static [u8]> =
            vec![b"", b"KURASNAP\x01\x00\x00\x00", b"KURAIDX1", b"KURAPLAN", b"KURAPLNK\x01", b"{\"version\":1,"];
        (proptest::sample::select(prefixes), proptest::collection::vec(any::<u8>(), 0..512)).prop_map(|(p, rest)| {
            let mut v = p.to_vec();
            v.extend(rest);
            v
        })
    }

    proptest! {
        #[test]
        fn no_decoder_panics_on_arbitrary_bytes(data in inputs()) {
            decode_tree(&data);
            decode_snapshot(&data);
            decode_index(&data);
            decode_pack(&data);
            decode_json_records(&data);
            decode_plan(&data);
        }
    }
}
