//! Space accounting in the manner of ZFS `used` and `referenced`.
//!
//! Blocks counted are those of the trees (nodes and data blocks), plus,
//! for a whole disk, its two header blocks and its snapshot log.
//!
//! - **referenced** of a version (a snapshot or the live disk): every block
//!   its tree reaches.
//! - **used** of a snapshot: the blocks no other version in the store
//!   references (what deleting it frees, when nothing branches from it).
//! - **used** of a disk: the blocks that only its own versions reference
//!   (what deleting the disk with its snapshots frees), metadata included.
//!
//! All figures come from walks beside neighbouring versions (see
//! `lineage.rs`): a version's exclusive blocks are those that neither its
//! parent nor its children hold at the same position; a disk's blocks are
//! the sum over its versions of what each adds to its parent (disjoint by
//! the connectivity invariant); a version's referenced count is its
//! parent's plus what it adds minus what it drops. One full walk per root
//! version, then work proportional to what changed.

use crate::disk::journal::{read_journal_cached, BlockCache, Chain};
use crate::disk::log::read_chain;
use crate::disk::{DiskState, Vdi};
use crate::error::{Error, Result};
use crate::lineage::{exclusive_of, ChainIndex, Overlaid, Version};
use crate::store::Store;
use parallax_format::BLOCK_SIZE_U64;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Space of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSpace {
    pub id: u64,
    pub name: String,
    /// Deleted, but kept because clones or branches derive from it.
    pub hidden: bool,
    pub referenced_bytes: u64,
    pub used_bytes: u64,
}

/// Space of one disk and its snapshots, as of its last commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpace {
    pub name: String,
    /// What the live disk references.
    pub referenced_bytes: u64,
    /// What only the live disk references.
    pub live_used_bytes: u64,
    /// What only this disk's versions reference, headers and log included.
    pub used_bytes: u64,
    /// Every snapshot, hidden ones included, oldest first.
    pub snapshots: Vec<SnapshotSpace>,
}

/// Every snapshot of disk `owner` (state `st`) as a version; the journal
/// snapshots of one base tree share one index of their longest chain
/// (the others are its prefixes), so that memory grows with the journals,
/// not with the journals times the snapshots.
fn snapshot_versions(store: &Store, st: &DiskState, owner: u64) -> Result<HashMap<u64, Version>> {
    let mut cache = BlockCache::new();
    let mut chains: HashMap<u64, Chain> = HashMap::new();
    for s in st.snapshots().all().filter(|s| !s.journal.is_null()) {
        chains.insert(
            s.id,
            read_journal_cached(store.pool(), s.journal, owner, &mut cache)?,
        );
    }
    // The longest chain of each base, indexed.
    let mut longest: HashMap<u64, u64> = HashMap::new();
    for s in st.snapshots().all().filter(|s| chains.contains_key(&s.id)) {
        let best = longest.entry(s.root.addr()).or_insert(s.id);
        if chains[&s.id].len() > chains[best].len() {
            *best = s.id;
        }
    }
    let mut indexes: HashMap<u64, Arc<ChainIndex>> = HashMap::new();
    for (base, id) in longest {
        let mut index = ChainIndex::new();
        for (k, r) in chains[&id].records().enumerate() {
            index.entry(r.vblock).or_default().push((k as u64, r.ptr));
        }
        indexes.insert(base, Arc::new(index));
    }
    let mut versions = HashMap::new();
    for s in st.snapshots().all() {
        let v = match chains.get(&s.id) {
            None => Version::tree(s.root),
            Some(c) => Version {
                root: s.root,
                overlay: Overlaid::Prefix {
                    index: indexes[&s.root.addr()].clone(),
                    len: c.len(),
                },
                journal: Arc::new(c.addrs()),
                records: c.len(),
            },
        };
        versions.insert(s.id, v);
    }
    Ok(versions)
}

fn count(store: &Store, v: &Version, others: &[&Version]) -> Result<u64> {
    let mut n = 0;
    exclusive_of(store.pool().meta(), v, others, &mut |_, _| n += 1)?;
    Ok(n)
}

/// A clone's versions that derive from its origin.
fn clone_roots(store: &Store, st: &DiskState) -> Result<Vec<Version>> {
    let mut roots = st
        .snapshots()
        .children(0)
        .iter()
        .map(|&id| st.version(store.pool(), id))
        .collect::<Result<Vec<_>>>()?;
    if st.live_parent() == 0 {
        roots.push(st.live_version());
    }
    Ok(roots)
}

impl Store {
    /// Space figures of `disk` and its snapshots. Commits the disk first.
    pub fn space(&self, disk: &str) -> Result<DiskSpace> {
        let vdi = self.open_vdi(disk)?;
        // Clones of this disk, opened before any disk lock is taken.
        let clones: Vec<Vdi> = if self.pool().has_clones(vdi.id()) {
            let names = self.clone_names(vdi.id())?;
            names
                .iter()
                .map(|n| self.open_vdi(n))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        vdi.flush()?;
        for c in &clones {
            c.flush()?;
        }
        let st = vdi.disk().read_state()?;
        // Origin-side lock first (lower id), then the clones'.
        let clone_states: Vec<_> = clones
            .iter()
            .map(|c| c.disk().read_state())
            .collect::<Result<_>>()?;
        let mut clone_children: HashMap<u64, Vec<Version>> = HashMap::new();
        for cs in &clone_states {
            clone_children
                .entry(cs.origin_snapshot())
                .or_default()
                .extend(clone_roots(self, cs)?);
        }
        let origin = st.version(self.pool(), 0)?;
        let live = st.live_version();
        // Versions: snapshot ids, and LIVE for the live tree (parent = live_parent).
        let mut roots = snapshot_versions(self, &st, vdi.id())?;
        let mut parents: HashMap<u64, u64> =
            st.snapshots().all().map(|s| (s.id, s.parent)).collect();
        const LIVE: u64 = u64::MAX;
        roots.insert(LIVE, live.clone());
        parents.insert(LIVE, st.live_parent());
        let parent_root = |parent: u64| -> Result<&Version> {
            if parent == 0 {
                return Ok(&origin);
            }
            roots
                .get(&parent)
                .ok_or_else(|| Error::Inconsistent(format!("snapshot parent {parent} missing")))
        };
        let children = |id: u64| -> Vec<&Version> {
            let mut out: Vec<&Version> = st
                .snapshots()
                .children(id)
                .iter()
                .map(|c| &roots[c])
                .collect();
            if id != LIVE && st.live_parent() == id {
                out.push(&roots[&LIVE]);
            }
            out.extend(clone_children.get(&id).into_iter().flatten());
            out
        };
        // referenced, computed parents first (ids grow with time, and a
        // version derives from an older one; the live tree comes last).
        let mut order: Vec<u64> = st.snapshots().all().map(|s| s.id).collect();
        order.push(LIVE);
        let mut referenced: HashMap<u64, u64> = HashMap::new();
        let mut disk_blocks = 0u64;
        for &id in &order {
            let v = &roots[&id];
            let p = parents[&id];
            let (added, base) = if p == 0 {
                (count(self, v, &[&origin])?, None)
            } else {
                let pr = &roots[&p];
                (count(self, v, &[pr])?, Some((p, count(self, pr, &[v])?)))
            };
            disk_blocks += added;
            let r = match base {
                None => count(self, v, &[])?,
                Some((p, dropped)) => referenced[&p] + added - dropped,
            };
            referenced.insert(id, r);
        }
        // Blocks of this disk that clones hold too are not the disk's alone.
        let mut shared_with_clones = HashSet::new();
        for (snap, croots) in &clone_children {
            let Some(v) = roots.get(snap) else {
                continue;
            };
            for c in croots {
                shared_in(self, c, v, &origin, &mut shared_with_clones)?;
            }
        }
        let log_blocks = read_chain(self.pool(), st.log_head(), vdi.id())?.len() as u64;
        let mut snapshots = Vec::new();
        for s in st.snapshots().all() {
            let mut others = children(s.id);
            others.push(parent_root(s.parent)?);
            snapshots.push(SnapshotSpace {
                id: s.id,
                name: s.name.clone(),
                hidden: s.hidden,
                referenced_bytes: referenced[&s.id] * BLOCK_SIZE_U64,
                used_bytes: count(self, &roots[&s.id], &others)? * BLOCK_SIZE_U64,
            });
        }
        let live_used = count(self, &live, &[parent_root(st.live_parent())?])?;
        let used = disk_blocks - shared_with_clones.len() as u64 + 2 + log_blocks;
        Ok(DiskSpace {
            name: st.name().to_string(),
            referenced_bytes: referenced[&LIVE] * BLOCK_SIZE_U64,
            live_used_bytes: live_used * BLOCK_SIZE_U64,
            used_bytes: used * BLOCK_SIZE_U64,
            snapshots,
        })
    }
}

impl Store {
    /// The same figures as [`Store::space`], for every disk, by brute
    /// force: every version of every disk walked in full, every block
    /// counted by who references it. Memory and time grow with the whole
    /// store; meant for verification (`parallax df --scan`, tests).
    pub fn space_scan(&self) -> Result<Vec<DiskSpace>> {
        let disks: Vec<Vdi> = self
            .list()
            .iter()
            .map(|n| self.open_vdi(n))
            .collect::<Result<_>>()?;
        for d in &disks {
            d.flush()?;
        }
        let mut sorted: Vec<&Vdi> = disks.iter().collect();
        sorted.sort_by_key(|d| d.id());
        let states: Vec<_> = sorted
            .iter()
            .map(|d| d.disk().read_state())
            .collect::<Result<_>>()?;
        /// Who references a block: versions, and the disk if only one.
        struct Refs {
            versions: u32,
            disk: Option<usize>,
        }
        let mut refs: HashMap<u64, Refs> = HashMap::new();
        // Per disk, per version (snapshot id or u64::MAX for live): blocks.
        let mut version_sets: Vec<Vec<(u64, HashSet<u64>)>> = Vec::new();
        for (i, st) in states.iter().enumerate() {
            let mut versions: Vec<(u64, Version)> = Vec::new();
            for s in st.snapshots().all() {
                versions.push((s.id, st.version(self.pool(), s.id)?));
            }
            versions.push((u64::MAX, st.live_version()));
            let mut sets = Vec::new();
            for (id, version) in versions {
                let mut set = HashSet::new();
                exclusive_of(self.pool().meta(), &version, &[], &mut |a, _| {
                    set.insert(a);
                })?;
                for &b in &set {
                    let r = refs.entry(b).or_insert(Refs {
                        versions: 0,
                        disk: Some(i),
                    });
                    r.versions += 1;
                    if r.disk != Some(i) {
                        r.disk = None;
                    }
                }
                sets.push((id, set));
            }
            version_sets.push(sets);
        }
        let mut out = Vec::new();
        for (i, st) in states.iter().enumerate() {
            let sets = &version_sets[i];
            let only_one =
                |set: &HashSet<u64>| set.iter().filter(|b| refs[b].versions == 1).count();
            let mut disk_set = HashSet::new();
            for (_, set) in sets {
                disk_set.extend(set.iter().copied().filter(|b| refs[b].disk == Some(i)));
            }
            let log_blocks = read_chain(self.pool(), st.log_head(), sorted[i].id())?.len() as u64;
            let (_, live) = sets.last().expect("the live version is always there");
            let snapshots = st
                .snapshots()
                .all()
                .zip(sets.iter())
                .map(|(s, (_, set))| SnapshotSpace {
                    id: s.id,
                    name: s.name.clone(),
                    hidden: s.hidden,
                    referenced_bytes: set.len() as u64 * BLOCK_SIZE_U64,
                    used_bytes: only_one(set) as u64 * BLOCK_SIZE_U64,
                })
                .collect();
            out.push(DiskSpace {
                name: st.name().to_string(),
                referenced_bytes: live.len() as u64 * BLOCK_SIZE_U64,
                live_used_bytes: only_one(live) as u64 * BLOCK_SIZE_U64,
                used_bytes: (disk_set.len() as u64 + 2 + log_blocks) * BLOCK_SIZE_U64,
                snapshots,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// Adds to `out` the blocks of the clone version `c` that it shares with
/// its origin snapshot `v` and that the disk's own origin `o` does not
/// hold: the disk's blocks the clone keeps alive (those of `v` not in `o`,
/// less those in neither `o` nor `c`).
fn shared_in(
    store: &Store,
    c: &Version,
    v: &Version,
    o: &Version,
    out: &mut HashSet<u64>,
) -> Result<()> {
    let meta = store.pool().meta();
    let mut not_in_o = HashSet::new();
    exclusive_of(meta, v, &[o], &mut |a, _| {
        not_in_o.insert(a);
    })?;
    let mut nor_in_c = HashSet::new();
    exclusive_of(meta, v, &[o, c], &mut |a, _| {
        nor_in_c.insert(a);
    })?;
    out.extend(not_in_o.difference(&nor_in_c).copied());
    Ok(())
}
