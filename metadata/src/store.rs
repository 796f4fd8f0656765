//! The member's durable state in one RocksDB: the raft log, hard state and truncation point
//! (column family `raft`), and the state machine's records with the applied index and conf state
//! (column family `sm`). Implements [`raft::Storage`].
//!
//! Durability, step by step:
//! - [`RaftStore::persist`] writes new log entries and the hard state in one synced batch: after
//!   it returns they are on media; a crash before it leaves the previous log, which raft treats as
//!   this member never having received the entries.
//! - [`RaftStore::apply_writes`] writes a state-machine change together with its applied index in
//!   one batch, not synced: the entries it applies are already durable in the log, and RocksDB's
//!   WAL is ordered, so a crash loses at most a suffix of applies, which are re-applied from the
//!   log on restart (state and applied index are never out of step).
//! - [`RaftStore::compact`] deletes applied log entries in a synced batch; as the WAL is ordered,
//!   the applies it depends on are durable once it is.
//! - [`RaftStore::install_snapshot`] replaces state, applied index, conf state and log in one
//!   synced batch: a crash leaves either the old member or the snapshot's, never a mix.

use std::path::Path;
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::prelude::*;
use raft::{GetEntriesContext, RaftState, StorageError};
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use crate::state::{ClusterState, Write};

const CF_RAFT: &str = "raft";
const CF_SM: &str = "sm";
const K_HARD_STATE: &[u8] = b"hard_state";
/// (index, term) of the last entry removed from the log by compaction or a snapshot.
const K_TRUNCATED: &[u8] = b"truncated";
const K_FORMAT: &[u8] = b"format_version";
/// Keys in `sm` that are not state-machine records.
const K_APPLIED: &[u8] = b"~applied";
const K_CONF_STATE: &[u8] = b"~conf_state";
const K_SNAPSHOTS_INSTALLED: &[u8] = b"~snapshots_installed";

/// Where a bootstrapped cluster's log begins (the entries before it never existed); see
/// [`RaftStore::bootstrap`].
pub const BOOTSTRAP_INDEX: u64 = 5;
pub const BOOTSTRAP_TERM: u64 = 5;

/// On-disk format of the metadata store. Bump on incompatible change; older stores are refused
/// with a clear message rather than misread.
pub const FORMAT_VERSION: u64 = 1;

/// A raw RocksDB key-value pair.
type KvPair = (Box<[u8]>, Box<[u8]>);

fn entry_key(index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'e';
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn storage_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

/// The snapshot body: the state machine's records.
#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotBody {
    format_version: u64,
    state: ClusterState,
}

pub struct RaftStore {
    db: DB,
    /// The applied state machine, shared read-only with the gRPC service.
    state: Arc<RwLock<ClusterState>>,
    hard_state: HardState,
    conf_state: ConfState,
    truncated: (u64, u64),
    last_index: u64,
    applied: (u64, u64),
    snapshots_installed: u64,
}

impl RaftStore {
    /// Opens (or creates) the store under `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = [CF_RAFT, CF_SM].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs)
            .map_err(|e| anyhow::anyhow!("opening metadata store {}: {e}", dir.display()))?;
        let raft_cf = db.cf_handle(CF_RAFT).expect("created above");
        match db.get_cf(raft_cf, K_FORMAT)? {
            None => {
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                db.put_cf_opt(raft_cf, K_FORMAT, FORMAT_VERSION.to_be_bytes(), &wo)?;
            }
            Some(v) if v.as_slice() == FORMAT_VERSION.to_be_bytes() => {}
            Some(v) => anyhow::bail!(
                "metadata store {} has format {:?}; this build reads format {FORMAT_VERSION}",
                dir.display(),
                v
            ),
        }
        let hard_state = match db.get_cf(raft_cf, K_HARD_STATE)? {
            Some(b) => HardState::parse_from_bytes(&b)?,
            None => HardState::default(),
        };
        let truncated = match db.get_cf(raft_cf, K_TRUNCATED)? {
            Some(b) => serde_json::from_slice(&b)?,
            None => (0, 0),
        };
        let last_index = {
            let mut it = db.raw_iterator_cf(raft_cf);
            it.seek_for_prev(entry_key(u64::MAX));
            match it.key() {
                Some(k) if k.len() == 9 && k[0] == b'e' => {
                    u64::from_be_bytes(k[1..].try_into().expect("9-byte key"))
                }
                _ => truncated.0,
            }
        };
        let sm_cf = db.cf_handle(CF_SM).expect("created above");
        let conf_state = match db.get_cf(sm_cf, K_CONF_STATE)? {
            Some(b) => ConfState::parse_from_bytes(&b)?,
            None => ConfState::default(),
        };
        let applied = match db.get_cf(sm_cf, K_APPLIED)? {
            Some(b) => serde_json::from_slice(&b)?,
            None => (0, 0),
        };
        let snapshots_installed = match db.get_cf(sm_cf, K_SNAPSHOTS_INSTALLED)? {
            Some(b) => serde_json::from_slice(&b)?,
            None => 0,
        };
        let mut hard_state = hard_state;
        if applied.0 > hard_state.commit {
            // A crash between writing an apply batch and the hard state that carried the new
            // commit index. Only committed entries are applied, so the commit index is at least
            // the applied one; lowering `applied` instead would apply entries twice.
            hard_state.commit = applied.0;
        }
        let records: Vec<KvPair> = db
            .iterator_cf(sm_cf, IteratorMode::Start)
            .collect::<Result<_, _>>()?;
        let state = ClusterState::from_records(records.iter().map(|(k, v)| (&k[..], &v[..])))
            .map_err(|e| anyhow::anyhow!("metadata store {}: {e}", dir.display()))?;
        Ok(Self {
            db,
            state: Arc::new(RwLock::new(state)),
            hard_state,
            conf_state,
            truncated,
            last_index: last_index.max(truncated.0),
            applied,
            snapshots_installed,
        })
    }

    pub fn state(&self) -> Arc<RwLock<ClusterState>> {
        self.state.clone()
    }

    /// Whether this store has never been part of a cluster.
    pub fn is_fresh(&self) -> bool {
        self.conf_state == ConfState::default() && self.last_index == 0 && self.hard_state.term == 0
    }

    pub fn applied(&self) -> u64 {
        self.applied.0
    }

    pub fn snapshots_installed(&self) -> u64 {
        self.snapshots_installed
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> anyhow::Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Bootstraps a fresh store as a member of a new cluster with these voters and addresses.
    pub fn bootstrap(&mut self, voters: &[(u64, String)]) -> anyhow::Result<()> {
        let cs = ConfState {
            voters: voters.iter().map(|(id, _)| *id).collect(),
            ..Default::default()
        };
        let mut writes = Vec::new();
        {
            let mut st = self.state.write().expect("state lock poisoned");
            for (id, addr) in voters {
                st.put_member(*id, Some(addr.clone()), &mut writes);
            }
        }
        self.conf_state = cs;
        // The initial state counts as applied at BOOTSTRAP_INDEX, and the log starts after it,
        // as if compacted there. A member that joins later (empty log) therefore cannot be fed
        // from index 1, which would replay a history without the initial configuration: it
        // must begin with a snapshot, which carries the configuration and state.
        let (index, term) = (BOOTSTRAP_INDEX, BOOTSTRAP_TERM);
        let raft_cf = self.cf(CF_RAFT);
        let hs = HardState {
            term,
            commit: index,
            ..Default::default()
        };
        let mut batch = WriteBatch::default();
        batch.put_cf(raft_cf, K_TRUNCATED, serde_json::to_vec(&(index, term))?);
        batch.put_cf(raft_cf, K_HARD_STATE, hs.write_to_bytes()?);
        let sm = self.cf(CF_SM);
        for w in &writes {
            batch.put_cf(
                sm,
                &w.key,
                w.value.as_deref().expect("bootstrap writes are puts"),
            );
        }
        batch.put_cf(sm, K_APPLIED, serde_json::to_vec(&(index, term))?);
        batch.put_cf(sm, K_CONF_STATE, self.conf_state.write_to_bytes()?);
        // After this synced write the member knows its initial configuration; a crash before it
        // leaves a fresh store, which bootstraps again the same way.
        self.write(batch, true)?;
        self.hard_state = hs;
        self.truncated = (index, term);
        self.last_index = index;
        self.applied = (index, term);
        Ok(())
    }

    /// Persists new log entries (replacing any conflicting suffix) and the hard state, synced.
    pub fn persist(&mut self, entries: &[Entry], hs: Option<&HardState>) -> anyhow::Result<()> {
        let cf = self.cf(CF_RAFT);
        let mut batch = WriteBatch::default();
        if let Some(first) = entries.first() {
            if first.index <= self.last_index {
                // A new leader overwrote our uncommitted suffix.
                batch.delete_range_cf(cf, entry_key(first.index), entry_key(self.last_index + 1));
            }
            for e in entries {
                batch.put_cf(cf, entry_key(e.index), e.write_to_bytes()?);
            }
        }
        if let Some(hs) = hs {
            batch.put_cf(cf, K_HARD_STATE, hs.write_to_bytes()?);
        }
        self.write(batch, true)?;
        if let Some(last) = entries.last() {
            self.last_index = last.index;
        }
        if let Some(hs) = hs {
            self.hard_state = hs.clone();
        }
        Ok(())
    }

    /// Records a commit index learned without a new hard state (raft's light ready).
    pub fn set_commit(&mut self, commit: u64) -> anyhow::Result<()> {
        self.hard_state.commit = commit;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_RAFT),
            K_HARD_STATE,
            self.hard_state.write_to_bytes()?,
        );
        // Not synced: a lost commit index is re-learned from the leader.
        self.write(batch, false)
    }

    /// Writes state-machine records together with the new applied index (and the conf state
    /// when `conf_changed`).
    pub fn apply_writes(
        &mut self,
        writes: &[Write],
        index: u64,
        term: u64,
        conf_changed: bool,
        sync: bool,
    ) -> anyhow::Result<()> {
        let cf = self.cf(CF_SM);
        let mut batch = WriteBatch::default();
        for w in writes {
            match &w.value {
                Some(v) => batch.put_cf(cf, &w.key, v),
                None => batch.delete_cf(cf, &w.key),
            }
        }
        if index > 0 {
            batch.put_cf(cf, K_APPLIED, serde_json::to_vec(&(index, term))?);
        }
        if conf_changed {
            batch.put_cf(cf, K_CONF_STATE, self.conf_state.write_to_bytes()?);
        }
        self.write(batch, sync)?;
        if index > 0 {
            self.applied = (index, term);
        }
        Ok(())
    }

    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// Removes log entries before `upto` (exclusive), which must be applied.
    pub fn compact(&mut self, upto: u64) -> anyhow::Result<()> {
        let upto = upto.min(self.applied.0 + 1);
        if upto <= self.truncated.0 + 1 {
            return Ok(());
        }
        let term = raft::Storage::term(self, upto - 1)?;
        let cf = self.cf(CF_RAFT);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, entry_key(0), entry_key(upto));
        batch.put_cf(cf, K_TRUNCATED, serde_json::to_vec(&(upto - 1, term))?);
        // Synced: afterwards the entries are gone for good, and (WAL order) every apply they
        // fed is on media too.
        self.write(batch, true)?;
        self.truncated = (upto - 1, term);
        Ok(())
    }

    pub fn first_index(&self) -> u64 {
        self.truncated.0 + 1
    }

    /// Replaces everything with a snapshot received from the leader.
    pub fn install_snapshot(&mut self, snap: &Snapshot) -> anyhow::Result<()> {
        let meta = snap.get_metadata();
        let body: SnapshotBody = serde_json::from_slice(&snap.data)?;
        anyhow::ensure!(
            body.format_version == FORMAT_VERSION,
            "snapshot has format {}; this build reads {FORMAT_VERSION}",
            body.format_version
        );
        let (index, term) = (meta.index, meta.term);
        let sm = self.cf(CF_SM);
        let raft_cf = self.cf(CF_RAFT);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(sm, b"".as_slice(), b"\xff".as_slice());
        for w in body.state.all_records() {
            batch.put_cf(sm, &w.key, w.value.expect("snapshot records are puts"));
        }
        batch.put_cf(sm, K_APPLIED, serde_json::to_vec(&(index, term))?);
        batch.put_cf(sm, K_CONF_STATE, meta.get_conf_state().write_to_bytes()?);
        batch.put_cf(
            sm,
            K_SNAPSHOTS_INSTALLED,
            serde_json::to_vec(&(self.snapshots_installed + 1))?,
        );
        batch.delete_range_cf(raft_cf, entry_key(0), entry_key(u64::MAX));
        batch.put_cf(raft_cf, K_TRUNCATED, serde_json::to_vec(&(index, term))?);
        let mut hs = self.hard_state.clone();
        hs.commit = hs.commit.max(index);
        hs.term = hs.term.max(term);
        batch.put_cf(raft_cf, K_HARD_STATE, hs.write_to_bytes()?);
        self.write(batch, true)?;
        *self.state.write().expect("state lock poisoned") = body.state;
        self.hard_state = hs;
        self.conf_state = meta.get_conf_state().clone();
        self.truncated = (index, term);
        self.last_index = index;
        self.applied = (index, term);
        self.snapshots_installed += 1;
        Ok(())
    }
}

impl raft::Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into();
        let mut out = Vec::with_capacity(usize::try_from(high - low).unwrap_or(0).min(1024));
        let mut size = 0u64;
        let mut it = self.db.raw_iterator_cf(self.cf(CF_RAFT));
        it.seek(entry_key(low));
        for idx in low..high {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                return Err(storage_err(format!("log entry {idx} missing")));
            };
            if k != entry_key(idx) {
                return Err(storage_err(format!("log entry {idx} missing")));
            }
            let e = Entry::parse_from_bytes(v).map_err(storage_err)?;
            size += u64::from(e.compute_size());
            if !out.is_empty() && max_size.is_some_and(|m| size > m) {
                break;
            }
            out.push(e);
            it.next();
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated.0 {
            return Ok(self.truncated.1);
        }
        if idx < self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let v = self
            .db
            .get_cf(self.cf(CF_RAFT), entry_key(idx))
            .map_err(storage_err)?
            .ok_or_else(|| storage_err(format!("log entry {idx} missing")))?;
        Ok(Entry::parse_from_bytes(&v).map_err(storage_err)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    /// A snapshot of the applied state. The raft loop owns both this store and the state
    /// machine, so the state read here is exactly the state at `self.applied`.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.applied.0 < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let state = self.state.read().expect("state lock poisoned").clone();
        let body = SnapshotBody {
            format_version: FORMAT_VERSION,
            state,
        };
        let mut snap = Snapshot {
            data: serde_json::to_vec(&body).map_err(storage_err)?.into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = self.applied.0;
        meta.term = self.applied.1;
        meta.set_conf_state(self.conf_state.clone());
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    /// Log entries and hard state survive a reopen; a conflicting append replaces the suffix.
    #[test]
    fn log_persists_and_truncates_suffix() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = RaftStore::open(dir.path()).unwrap();
            assert!(s.is_fresh());
            let ents: Vec<Entry> = (1..=5).map(|i| entry(i, 1)).collect();
            let hs = HardState {
                term: 2,
                commit: 3,
                ..Default::default()
            };
            s.persist(&ents, Some(&hs)).unwrap();
            s.persist(&[entry(4, 2)], None).unwrap();
            assert_eq!(s.last_index().unwrap(), 4);
        }
        let s = RaftStore::open(dir.path()).unwrap();
        assert_eq!(s.last_index().unwrap(), 4);
        assert_eq!(s.term(4).unwrap(), 2);
        assert_eq!(s.term(3).unwrap(), 1);
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 3);
        let got = s
            .entries(2, 5, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            got.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        let one = s
            .entries(2, 5, Some(1), GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(one.len(), 1, "max_size still returns one entry");
    }

    /// Compaction keeps the term of the last removed entry, and reads below it fail with
    /// `Compacted`, also after a reopen.
    #[test]
    fn compaction() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = RaftStore::open(dir.path()).unwrap();
            s.persist(
                &(1..=10).map(|i| entry(i, i / 3 + 1)).collect::<Vec<_>>(),
                None,
            )
            .unwrap();
            s.apply_writes(&[], 8, 3, false, false).unwrap();
            s.compact(100).unwrap(); // clamped to applied + 1
        }
        let s = RaftStore::open(dir.path()).unwrap();
        assert_eq!(s.first_index(), 9);
        assert_eq!(s.term(8).unwrap(), 3);
        assert!(matches!(
            s.term(7),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert!(matches!(
            s.entries(5, 9, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(
            s.entries(9, 11, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            2
        );
    }

    /// After a crash that left an apply batch on disk but not the hard state with the newer
    /// commit index, the store reopens with commit raised to the applied index.
    #[test]
    fn applied_ahead_of_commit_after_crash() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = RaftStore::open(dir.path()).unwrap();
            let hs = HardState {
                term: 1,
                commit: 2,
                ..Default::default()
            };
            s.persist(&(1..=4).map(|i| entry(i, 1)).collect::<Vec<_>>(), Some(&hs))
                .unwrap();
            s.apply_writes(&[], 4, 1, false, false).unwrap();
        }
        let s = RaftStore::open(dir.path()).unwrap();
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 4);
        assert_eq!(s.applied(), 4);
    }

    /// A snapshot taken from one store installs into a fresh one: same state, same digest,
    /// log truncated at the snapshot's index; and it survives a reopen.
    #[test]
    fn snapshot_round_trip() {
        let a_dir = tempfile::tempdir().unwrap();
        let b_dir = tempfile::tempdir().unwrap();
        let mut a = RaftStore::open(a_dir.path()).unwrap();
        a.bootstrap(&[(1, "127.0.0.1:1".into()), (2, "127.0.0.1:2".into())])
            .unwrap();
        a.persist(&(6..=8).map(|i| entry(i, 6)).collect::<Vec<_>>(), None)
            .unwrap();
        a.apply_writes(&[], 8, 6, false, false).unwrap();
        let snap = a.snapshot(8, 2).unwrap();
        let digest = a.state().read().unwrap().digest();
        {
            let mut b = RaftStore::open(b_dir.path()).unwrap();
            b.install_snapshot(&snap).unwrap();
            assert_eq!(b.state().read().unwrap().digest(), digest);
        }
        let b = RaftStore::open(b_dir.path()).unwrap();
        assert_eq!(b.state().read().unwrap().digest(), digest);
        assert_eq!(b.first_index(), 9);
        assert_eq!(b.applied(), 8);
        assert_eq!(b.snapshots_installed(), 1);
        assert_eq!(b.initial_state().unwrap().conf_state.voters, vec![1, 2]);
        assert!(matches!(
            a.snapshot(9, 2),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        ));
    }
}
