//! The consistency check (and the mark it shares with `gc`).
//!
//! Both start with the same *mark* pass over the durable state: from the
//! newest valid superblock, every registry block, every disk's newest valid
//! header, its snapshot log, its live tree and every snapshot's tree, and
//! (format 2) their entry journals. Every node is read from the device and
//! verified (checksum, kind, level, store id, address, the parent's check
//! value).
//!
//! **Journal versions.** A version with a journal is its base tree plus
//! its records: a base entry every version of that base replaces with a
//! record may have been freed (the live tree owned it when it replaced
//! it), so a base tree is walked with the blocks *all* its versions
//! replace skipped (its *shadow*), and each version marks its own records'
//! blocks. A node is descended into once per shadow it is reached with
//! (once in all if reached with none), so that a block some other version
//! reaches without that shadow is still marked.
//!
//! `check` then verifies the invariants the crash-consistency argument
//! relies on:
//! - every referenced block lies in an extent's data area and is marked
//!   allocated in the durable bitmap;
//! - no block is used in two roles (node and data, log and header...);
//! - every block a live tree owns (reached from its root through writable
//!   pointers only) is referenced exactly once in the whole store, so
//!   changing it in place cannot affect a snapshot or another disk;
//! - names are unique, ids below the superblock's next id.
//!
//! Blocks marked allocated but unreferenced are *leaks*: legal after a
//! crash or a snapshot delete, reported, and returned by `gc`.
//!
//! **Shared mode** (docs/CLUSTER.md, "check and gc"): both run under the
//! catalogue lock, with every appliance running. A disk this host does not
//! have open may be committed by its holder while it is read: a walk that
//! fails on it is retried from a fresh header, in a scratch marking merged
//! only when whole; a disk that kept changing is *unverified* (`check`
//! warns, `gc` refuses). Placement and leaks are judged only in this
//! host's extents: another host's bitmap may free a block the moment after
//! its holder's header stopped referencing it, and its allocated but
//! unreferenced blocks may be writes in flight there.

use crate::alloc::Allocator;
use crate::disk::journal::{read_journal_cached, BlockCache, Chain};
use crate::disk::log::read_chain;
use crate::error::{Error, Result};
use crate::lineage::SnapSet;
use crate::store::catalog::{read_header_copies, read_vdi_header, Catalog};
use crate::store::Store;
use parallax_format::{
    DiskRef, Ptr, Superblock, BLOCK_SIZE, BLOCK_SIZE_U64, SUPERBLOCK_ADDRS, TREE_HEIGHT,
};
use parallax_format::{JournalRecord, RegistryEntry, VdiHeader};
use std::collections::{BTreeSet, HashMap, HashSet};

/// What `check` found.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Violated invariants: the store is damaged.
    pub errors: Vec<String>,
    /// Harmless findings (a torn superblock copy, leaked blocks).
    pub warnings: Vec<String>,
    pub disks: u64,
    pub snapshots: u64,
    pub tree_nodes: u64,
    pub data_blocks: u64,
    pub metadata_blocks: u64,
    pub leaked_blocks: u64,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Registry,
    Header,
    Log,
    Journal,
    Node(u8),
    Data,
}

/// One version with a journal, as `mark_disk` groups them by base tree.
struct JournalVersion {
    who: String,
    chain: Chain,
    live: bool,
}

/// Whether chain `a` is a prefix of chain `b` (whose block addresses are
/// `in_b`): every block of `a` but its head is one of `b`'s, and its head's
/// records start the block of `b` at the same place.
fn is_prefix(a: &Chain, b: &Chain, in_b: &HashSet<u64>) -> std::result::Result<(), String> {
    let Some((head_addr, head)) = a.blocks.last() else {
        return Ok(());
    };
    for (addr, _) in &a.blocks[..a.blocks.len() - 1] {
        if !in_b.contains(addr) {
            return Err(format!("block {addr} is not in it"));
        }
    }
    if in_b.contains(head_addr) {
        return Ok(());
    }
    let same_place = b.blocks.iter().find(|(_, x)| x.first == head.first);
    match same_place {
        Some((_, x)) if x.records.starts_with(&head.records) => Ok(()),
        _ => Err(format!("its records from {} on differ", head.first)),
    }
}

/// The blocks a base tree is walked without (see the module
/// documentation): its root's address and the virtual blocks every version
/// of it replaces.
struct Shadow {
    base: u64,
    vblocks: BTreeSet<u64>,
}

#[derive(Default)]
pub(super) struct Marking<'p> {
    /// Called with the number of blocks marked so far, now and then.
    progress: Option<&'p (dyn Fn(u64) + Sync)>,
    pub(super) roles: HashMap<u64, Role>,
    refs: HashMap<u64, u32>,
    pub(super) errors: Vec<String>,
    warnings: Vec<String>,
    /// For each disk, the blocks its live tree owns.
    live_owned: Vec<(String, HashSet<u64>)>,
    /// Nodes descended into: node ─▶ the shadows (base addresses; 0 for
    /// none) it was walked with.
    descended: HashMap<u64, Vec<u64>>,
    /// Shared mode: disks that changed under every try (see the module
    /// documentation), and why the last try failed.
    pub(super) unverified: Vec<String>,
    disks: u64,
    snapshots: u64,
}

/// How many times a disk another host may be committing is read before it
/// is left unverified.
const TRIES: usize = 5;

impl Marking<'_> {
    /// Every referenced block must lie in an extent's data area and be
    /// marked allocated in the durable bitmap `alloc`: what `check` reports
    /// and what `gc` refuses to free around.
    ///
    /// With `host`, only blocks in extents `host` owns are judged (shared
    /// mode: see the module documentation).
    pub(super) fn placement_errors(
        &self,
        sb: &Superblock,
        alloc: &Allocator,
        host: Option<u64>,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        for (&addr, role) in &self.roles {
            let judged = host.is_none_or(|h| alloc.owner_of(addr) == Some(h));
            if sb.locate(addr).is_some() && !judged {
                continue;
            }
            if sb.locate(addr).is_none() {
                errors.push(format!(
                    "block {addr} ({role:?}) is not in any extent's data area"
                ));
            } else if !alloc.is_allocated(addr) {
                errors.push(format!(
                    "block {addr} ({role:?}) is referenced but marked free in its extent bitmap"
                ));
            }
        }
        errors.sort();
        errors
    }

    /// Records a reference; returns true the first time the block is seen.
    fn mark(&mut self, addr: u64, role: Role, who: &str) -> bool {
        self.mark_n(addr, role, who, 1)
    }

    /// Records `n` references.
    fn mark_n(&mut self, addr: u64, role: Role, who: &str, n: u32) -> bool {
        *self.refs.entry(addr).or_insert(0) += n;
        match self.roles.get(&addr) {
            None => {
                self.roles.insert(addr, role);
                if self.roles.len().is_multiple_of(4096) {
                    if let Some(p) = self.progress {
                        p(self.roles.len() as u64);
                    }
                }
                true
            }
            Some(r) if *r == role => false,
            Some(r) => {
                self.errors.push(format!(
                    "block {addr} is used as {r:?} and as {role:?} (by {who})"
                ));
                false
            }
        }
    }

    /// Marks everything one header of disk `name` reaches: its snapshot
    /// log, every snapshot's tree and its live tree. Returns the blocks
    /// the live tree owns (reached through writable pointers only).
    pub(super) fn mark_disk(
        &mut self,
        store: &Store,
        name: &str,
        header: &VdiHeader,
    ) -> HashSet<u64> {
        let who = format!("disk {name}");
        let meta = store.pool().meta();
        let log = match read_chain(store.pool(), header.log_head, header.vdi_id) {
            Ok(l) => l,
            Err(e) => {
                self.errors.push(format!("{who}: snapshot log: {e}"));
                Vec::new()
            }
        };
        let mut snaps = SnapSet::default();
        for (addr, block) in &log {
            self.mark(*addr, Role::Log, &who);
            for e in &block.entries {
                snaps.apply(e);
            }
        }
        if snaps.visible_len() as u64 != header.snapshot_count {
            self.errors.push(format!(
                "{who}: header counts {} snapshots, the log has {}",
                header.snapshot_count,
                snaps.visible_len()
            ));
        }
        if header.live_parent != 0 && snaps.get(header.live_parent).is_none() {
            self.errors.push(format!(
                "{who}: the live tree's parent snapshot id {} is missing",
                header.live_parent
            ));
        }
        // Versions by base tree (root address): each with its journal chain
        // (the live tree last).
        let mut cache = BlockCache::new();
        let mut by_base: HashMap<u64, Vec<JournalVersion>> = HashMap::new();
        let versions = snaps
            .all()
            .map(|s| {
                let who = format!("snapshot {}", DiskRef::snapshot(name, &s.name));
                (who, s.root, s.journal, false)
            })
            .chain([(who.clone(), header.root, header.journal_head, true)]);
        for (by, root, head, live) in versions {
            let chain = match read_journal_cached(store.pool(), head, header.vdi_id, &mut cache) {
                Ok(c) => c,
                Err(e) => {
                    self.errors.push(format!("{by}: entry journal: {e}"));
                    Chain::default()
                }
            };
            for (addr, _) in &chain.blocks {
                self.mark(*addr, Role::Journal, &by);
            }
            by_base
                .entry(root.addr())
                .or_default()
                .push(JournalVersion {
                    who: by,
                    chain,
                    live,
                });
        }
        drop(cache);
        let mut shadows: HashMap<u64, Shadow> = HashMap::new();
        let mut owned = HashSet::new();
        for (base, versions) in &by_base {
            if let Some(shadow) = self.mark_journals(versions, &mut owned) {
                shadows.insert(
                    *base,
                    Shadow {
                        base: *base,
                        vblocks: shadow,
                    },
                );
            }
        }
        for s in snaps.all() {
            let snap = format!("snapshot {}", DiskRef::snapshot(name, &s.name));
            if !s.hidden {
                self.snapshots += 1;
            }
            if s.id >= header.next_snapshot_id || (s.parent != 0 && snaps.get(s.parent).is_none()) {
                self.errors.push(format!(
                    "{snap}: id {} not yet issued, or parent {} missing",
                    s.id, s.parent
                ));
            }
            self.walk_tree(store, s.root, &snap, None, shadows.get(&s.root.addr()));
        }
        self.walk_tree(
            store,
            header.root,
            &who,
            Some(&mut owned),
            shadows.get(&header.root.addr()),
        );
        if let Err(e) = meta.check_ptr(header.root, "root") {
            self.errors.push(format!("{who}: {e}"));
        }
        owned
    }

    /// Marks the data blocks the records of the journal versions of one
    /// base tree name: a record's block is referenced by every version
    /// whose chain reaches it and no later record of the same virtual block
    /// (one pass over the longest chain: the chains of one base are
    /// prefixes of each other, which is checked). Adds to `owned` the live
    /// tree's: its chain's blocks no snapshot holds, and the writable
    /// entries of records no snapshot holds. Returns the virtual blocks
    /// every version replaces (the base tree's shadow), if any.
    fn mark_journals(
        &mut self,
        versions: &[JournalVersion],
        owned: &mut HashSet<u64>,
    ) -> Option<BTreeSet<u64>> {
        let longest = versions.iter().max_by_key(|v| v.chain.len())?;
        if longest.chain.len() == 0 {
            return None;
        }
        let in_longest: HashSet<u64> = longest.chain.blocks.iter().map(|(a, _)| *a).collect();
        for v in versions {
            if let Err(why) = is_prefix(&v.chain, &longest.chain, &in_longest) {
                self.errors.push(format!(
                    "{}: its entry journal is not a prefix of {}'s, which shares its base tree: {why}",
                    v.who, longest.who
                ));
                return None;
            }
        }
        let records: Vec<JournalRecord> = longest.chain.records().copied().collect();
        // The index of the next record of the same block (or the end).
        let mut next = vec![u64::MAX; records.len()];
        let mut seen: HashMap<u64, u64> = HashMap::new();
        for (k, r) in records.iter().enumerate().rev() {
            if let Some(&n) = seen.get(&r.vblock) {
                next[k] = n;
            }
            seen.insert(r.vblock, k as u64);
        }
        let mut lens: Vec<u64> = versions.iter().map(|v| v.chain.len()).collect();
        lens.sort_unstable();
        let live = versions.iter().find(|v| v.live);
        let sealed = versions
            .iter()
            .filter(|v| !v.live)
            .map(|v| v.chain.len())
            .max()
            .unwrap_or(0);
        for (k, r) in records.iter().enumerate() {
            let k = k as u64;
            // Versions of lengths in (k, next]: they hold this record.
            let from = lens.partition_point(|&l| l <= k);
            let to = lens.partition_point(|&l| l <= next[k as usize]);
            let holders = (to - from) as u32;
            if holders == 0 || r.ptr.is_null() {
                continue;
            }
            self.mark_n(r.ptr.addr(), Role::Data, &longest.who, holders);
            let live_holds =
                live.is_some_and(|l| k < l.chain.len() && l.chain.len() <= next[k as usize]);
            if live_holds && k >= sealed && r.ptr.writable() {
                owned.insert(r.ptr.addr());
            }
        }
        if let Some(l) = live {
            let held: HashSet<u64> = versions
                .iter()
                .filter(|v| !v.live)
                .flat_map(|v| v.chain.blocks.iter().map(|(a, _)| *a))
                .collect();
            owned.extend(
                l.chain
                    .blocks
                    .iter()
                    .map(|(a, _)| *a)
                    .filter(|a| !held.contains(a)),
            );
        }
        // Every version replaces what the shortest replaces (prefixes).
        let shortest = versions.iter().min_by_key(|v| v.chain.len())?;
        let shadow: BTreeSet<u64> = shortest.chain.records().map(|r| r.vblock).collect();
        (!shadow.is_empty()).then_some(shadow)
    }

    fn walk_tree(
        &mut self,
        store: &Store,
        root: Ptr,
        who: &str,
        owned: Option<&mut HashSet<u64>>,
        shadow: Option<&Shadow>,
    ) {
        let mut owned = owned;
        // The root pointer itself says whether the live tree owns the base
        // (a journal snapshot shares it otherwise).
        let writable = owned.is_none() || root.writable();
        self.walk(
            store,
            root,
            (TREE_HEIGHT - 1) as u8,
            0,
            who,
            writable,
            &mut owned,
            shadow,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn walk(
        &mut self,
        store: &Store,
        ptr: Ptr,
        level: u8,
        pfx: u64,
        who: &str,
        path_writable: bool,
        owned: &mut Option<&mut HashSet<u64>>,
        shadow: Option<&Shadow>,
    ) {
        self.mark(ptr.addr(), Role::Node(level), who);
        if path_writable {
            if let Some(o) = owned.as_deref_mut() {
                o.insert(ptr.addr());
            }
        }
        // A node shared by several trees is descended into once per shadow
        // (see the module documentation). (A live tree's owned node seen
        // before is already an error: its reference count is above one.)
        let context = shadow.map_or(0, |s| s.base);
        let seen = self.descended.entry(ptr.addr()).or_default();
        if seen.contains(&0) || seen.contains(&context) {
            return;
        }
        seen.push(context);
        let node = match store.pool().meta().load_node(ptr, level) {
            Ok(n) => n,
            Err(e) => {
                self.errors.push(format!("{who}: {e}"));
                return;
            }
        };
        let fan = parallax_format::FAN_OUT as u64;
        for (i, e) in node.entries.iter().enumerate() {
            if e.is_null() {
                continue;
            }
            let writable = path_writable && e.writable();
            let child = pfx * fan + i as u64;
            if level == 0 {
                if shadow.is_some_and(|s| s.vblocks.contains(&child)) {
                    continue;
                }
                self.mark(e.addr(), Role::Data, who);
                if writable {
                    if let Some(o) = owned.as_deref_mut() {
                        o.insert(e.addr());
                    }
                }
            } else {
                let below = shadow.filter(|s| {
                    let n = crate::tree::span(level);
                    s.vblocks.range(child * n..(child + 1) * n).next().is_some()
                });
                self.walk(store, *e, level - 1, child, who, writable, owned, below);
            }
        }
    }
}

pub(super) fn mark_all<'p>(
    store: &Store,
    catalog: &Catalog,
    progress: Option<&'p (dyn Fn(u64) + Sync)>,
) -> Marking<'p> {
    let mut m = Marking {
        progress,
        ..Marking::default()
    };
    for (slot, p) in catalog.sb().registry.iter().enumerate() {
        if !p.is_null() {
            m.mark(p.addr(), Role::Registry, &format!("registry slot {slot}"));
        }
    }
    let open_here: HashSet<u64> = store.open_disk_ids().into_iter().collect();
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    for entry in catalog.entries() {
        m.disks += 1;
        let who = format!("disk {}", entry.name);
        if !names.insert(entry.name.clone()) {
            m.errors
                .push(format!("{who}: name used twice in the registry"));
        }
        if !ids.insert(entry.vdi_id) || entry.vdi_id >= catalog.sb().next_vdi_id {
            m.errors.push(format!(
                "{who}: id {} is duplicated or not yet issued",
                entry.vdi_id
            ));
        }
        m.mark(entry.header_a, Role::Header, &who);
        m.mark(entry.header_b, Role::Header, &who);
        if store.is_shared() && !open_here.contains(&entry.vdi_id) {
            m.mark_changing(store, &entry);
            continue;
        }
        let header = match read_vdi_header(store.pool(), &entry) {
            Ok((h, _)) => h,
            Err(e) => {
                m.errors.push(format!("{who}: {e}"));
                continue;
            }
        };
        m.stale_epochs(store, &entry, &header);
        m.mark_header(store, &entry, &header);
    }
    m
}

impl Marking<'_> {
    /// Reports a header copy of a newer generation than the one in use but
    /// an older writer epoch: a commit its writer finished after losing
    /// the disk, ignored (see `catalog::newer_header`).
    fn stale_epochs(&mut self, store: &Store, entry: &RegistryEntry, header: &VdiHeader) {
        let Ok(copies) = read_header_copies(store.pool(), entry) else {
            return;
        };
        for h in copies.into_iter().flatten() {
            if h.generation > header.generation && h.writer_epoch < header.writer_epoch {
                self.warnings.push(format!(
                    "disk {}: a commit of generation {} by host {} under epoch {} came after that host lost the disk (epoch {} is in use); it is ignored",
                    entry.name, h.generation, h.writer_host, h.writer_epoch, header.writer_epoch
                ));
            }
        }
    }

    /// Marks what `header`, disk `entry`'s newest header, reaches.
    fn mark_header(&mut self, store: &Store, entry: &RegistryEntry, header: &VdiHeader) {
        if header.name != entry.name {
            self.warnings.push(format!(
                "disk {}: header records the name {:?}",
                entry.name, header.name
            ));
        }
        let owned = self.mark_disk(store, &entry.name, header);
        self.live_owned.push((entry.name.clone(), owned));
    }

    /// Shared mode: marks disk `entry`, which another host may be
    /// committing, from a header that stays readable for the whole walk
    /// (see the module documentation).
    fn mark_changing(&mut self, store: &Store, entry: &RegistryEntry) {
        let who = format!("disk {}", entry.name);
        let mut last = String::new();
        for _ in 0..TRIES {
            let header = match read_vdi_header(store.pool(), entry) {
                Ok((h, _)) => h,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let mut scratch = Marking::default();
            scratch.mark_header(store, entry, &header);
            let unchanged = || {
                read_vdi_header(store.pool(), entry)
                    .is_ok_and(|(h, _)| h.generation == header.generation)
            };
            // Whole, or failing on a header still current: damage.
            if scratch.errors.is_empty() || unchanged() {
                self.absorb(scratch, &who);
                self.stale_epochs(store, entry, &header);
                return;
            }
            last = scratch.errors.join("; ");
        }
        self.unverified.push(format!(
            "{who}: its holder committed while it was read, {TRIES} times ({last})"
        ));
    }

    /// Merges a marking of one disk.
    fn absorb(&mut self, other: Marking<'_>, who: &str) {
        for (addr, role) in other.roles {
            let n = other.refs.get(&addr).copied().unwrap_or(1);
            self.mark_n(addr, role, who, n);
        }
        self.errors.extend(other.errors);
        self.warnings.extend(other.warnings);
        self.live_owned.extend(other.live_owned);
        self.snapshots += other.snapshots;
    }
}

pub(super) fn durable_allocator(store: &Store, sb: &Superblock) -> Result<Allocator> {
    Allocator::load(&*store.pool().meta().dev, sb, 0)
}

impl Store {
    /// Verifies every invariant of the durable state. Disks this store has
    /// open are committed first, so that what they hold in memory is not
    /// reported as leaked; they go on serving while the check reads, with
    /// their frees held back until it has read the bitmaps (so a commit in
    /// between cannot make a block it read look free). Blocks the pool was
    /// asked to free twice since the store was opened (a bug) are reported
    /// as an error too. In shared mode, it runs under the catalogue lock
    /// with every appliance running (see the module documentation for what
    /// it judges there).
    pub fn check(&self) -> Result<CheckReport> {
        let host = self.pool().coordinator().map(|c| c.host_id());
        let catalog = self.catalog()?;
        let sb = catalog.sb().clone();
        let mut report = CheckReport::default();
        for disk in self.open_disks() {
            if let Err(e) = disk.commit_pending() {
                report.warnings.push(format!(
                    "an open disk could not be committed before the check ({e}); what it holds in memory may show as leaked"
                ));
            }
        }
        self.pool().sync_bitmaps()?;
        // Disks keep running: nothing they free may reach the bitmaps (or be
        // reused) until the durable state has been read whole.
        let held = self.pool().hold_frees();
        for &addr in &SUPERBLOCK_ADDRS {
            let mut b = vec![0u8; BLOCK_SIZE];
            self.pool()
                .meta()
                .dev
                .read_at(&mut b, addr * BLOCK_SIZE_U64)
                .map_err(Error::io("reading the superblock"))?;
            if let Err(e) = Superblock::decode(&b, addr) {
                report.warnings.push(format!(
                    "superblock copy {addr} is not usable ({e}); the other copy is in use"
                ));
            }
        }
        let mut m = mark_all(self, &catalog, None);
        drop(catalog);
        let alloc = durable_allocator(self, &sb)?;
        drop(held);
        let mut placement = m.placement_errors(&sb, &alloc, host);
        m.errors.append(&mut placement);
        for why in &m.unverified {
            m.warnings.push(format!("not verified: {why}"));
        }
        for role in m.roles.values() {
            match role {
                Role::Node(_) => report.tree_nodes += 1,
                Role::Data => report.data_blocks += 1,
                _ => report.metadata_blocks += 1,
            }
        }
        for (name, owned) in &m.live_owned {
            for addr in owned {
                let refs = m.refs.get(addr).copied().unwrap_or(0);
                if refs != 1 {
                    m.errors.push(format!(
                        "disk {name} owns block {addr} (writable path) but it is referenced {refs} times"
                    ));
                }
            }
        }
        // Leaks: allocated, unreferenced data-area blocks (shared mode: of
        // this host's extents; elsewhere they may be writes in flight).
        let mut elsewhere = 0u64;
        for e in 0..sb.extent_count {
            let start = sb.extent_start(e) + 2;
            for i in 0..sb.extent_len(e) {
                let addr = start + i;
                if alloc.is_allocated(addr) && !m.roles.contains_key(&addr) {
                    if host.is_none_or(|h| alloc.owner_of(addr) == Some(h)) {
                        report.leaked_blocks += 1;
                    } else {
                        elsewhere += 1;
                    }
                }
            }
        }
        if elsewhere > 0 {
            m.warnings.push(format!(
                "{elsewhere} blocks of extents other appliances own are allocated but unreferenced by their durable state: writes in flight there, or leaks their own `gc` returns"
            ));
        }
        if report.leaked_blocks > 0 {
            m.warnings.push(format!(
                "{} blocks are allocated but unreferenced (leaked by a crash, a deleted snapshot or a rollback); `gc` returns them",
                report.leaked_blocks
            ));
        }
        for extent in self.pool().lost_bitmaps() {
            m.errors.push(format!(
                "extent {extent} has no valid bitmap copy (`parallax repair` rebuilds it)"
            ));
        }
        if let Some(reason) = self.pool().damaged() {
            m.errors.push(format!(
                "the store takes no writes: when it was opened, {reason}"
            ));
        }
        let double_frees = self.pool().double_frees();
        if double_frees > 0 {
            m.errors.push(format!(
                "{double_frees} blocks were freed twice since the store was opened (a bug: the allocator ignored the second free)"
            ));
        }
        m.errors.sort();
        m.errors.dedup();
        report.errors = m.errors;
        report.warnings.append(&mut m.warnings);
        report.disks = m.disks;
        report.snapshots = m.snapshots;
        Ok(report)
    }
}
