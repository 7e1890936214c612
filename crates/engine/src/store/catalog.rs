//! The catalogue: the superblock (two copies) and the registry of disks,
//! and the operations that change it (create, clone, delete a disk).
//!
//! Catalogue changes are committed through the superblock: the registry
//! block that changes is copied to a new block, the bitmaps are synced and
//! flushed, then the superblock copy with the lower generation is
//! overwritten and flushed ([`commit_superblock`]). A failure at the
//! superblock write poisons the catalogue. Per-disk commits never touch
//! the superblock (see `disk/commit.rs`), so several hosts will be able to
//! commit their own disks independently and take a store-wide lock only
//! for catalogue changes.

use crate::disk::{Disk, Holds, Origin, Vdi, MAX_VDI_SIZE};
use crate::error::{Error, Result};
use crate::pool::Pool;
use crate::store::Store;
use crate::time::now_ns;
use crate::tree::Tree;
use parallax_device::BlockDevice;
use parallax_format::{
    validate_name, BitmapBlock, Block, DiskRef, FormatError, Ptr, RegistryBlock, RegistryEntry,
    Superblock, VdiHeader, BITMAP_BITS, BLOCK_SIZE, BLOCK_SIZE_U64, FORMAT_VERSION, MAGIC,
    REGISTRY_ENTRIES_PER_BLOCK, SUPERBLOCK_ADDRS, SUPERBLOCK_REGISTRY_SLOTS, VDI_FLAG_LINEAGE,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The superblock and the decoded registry, behind the store's catalogue
/// lock.
pub(crate) struct Catalog {
    sb: Superblock,
    /// Superblock copy the next catalogue commit writes.
    next_sb_slot: usize,
    /// Decoded registry blocks, parallel to `sb.registry`.
    registry: Vec<Option<RegistryBlock>>,
    /// Name ─▶ registry slot, and disk id ─▶ registry slot: lookups cost
    /// one hash and one block's entries, not a scan of every disk.
    by_name: HashMap<String, usize>,
    by_id: HashMap<u64, usize>,
    poisoned: bool,
}

impl Catalog {
    pub(super) fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    pub(super) fn poison(&mut self) {
        self.poisoned = true;
    }

    /// Reads and checks the registry blocks of superblock `sb` (found in
    /// copy `slot`).
    pub(super) fn load(pool: &Pool, sb: Superblock, slot: usize) -> Result<Catalog> {
        let meta = pool.meta();
        let mut registry = Vec::with_capacity(sb.registry.len());
        for (i, p) in sb.registry.iter().enumerate() {
            if p.is_null() {
                registry.push(None);
                continue;
            }
            if pool.vouches_for(p.addr()) == Some(false) {
                pool.set_damaged(format!(
                    "superblock generation {} references registry block {}, which the extent bitmap marks free (a bitmap or superblock write was lost or went back in time)",
                    sb.generation,
                    p.addr()
                ));
            }
            let raw = meta.read_block(p.addr(), "a registry block")?;
            let (block, crc) = RegistryBlock::decode(&raw[..], p.addr(), Some(sb.store_id))?;
            p.verify_crc(crc)?;
            for e in &block.entries {
                for h in [e.header_a, e.header_b] {
                    meta.check_ptr(Ptr::data(h.max(1), false), &format!("registry slot {i}"))?;
                }
            }
            registry.push(Some(block));
        }
        let mut catalog = Catalog {
            sb,
            next_sb_slot: 1 - slot,
            by_name: HashMap::new(),
            by_id: HashMap::new(),
            registry,
            poisoned: false,
        };
        catalog.reindex();
        Ok(catalog)
    }

    pub fn sb(&self) -> &Superblock {
        &self.sb
    }

    /// Rebuilds the name and id indexes from the registry blocks.
    fn reindex(&mut self) {
        self.by_name.clear();
        self.by_id.clear();
        for (slot, block) in self.registry.iter().enumerate() {
            for e in block.iter().flat_map(|b| &b.entries) {
                self.by_name.insert(e.name.clone(), slot);
                self.by_id.insert(e.vdi_id, slot);
            }
        }
    }

    /// Replaces registry slot `slot` (after a catalogue commit).
    fn set_slot(&mut self, slot: usize, block: Option<RegistryBlock>) {
        for e in self.registry[slot].iter().flat_map(|b| &b.entries) {
            self.by_name.remove(&e.name);
            self.by_id.remove(&e.vdi_id);
        }
        for e in block.iter().flat_map(|b| &b.entries) {
            self.by_name.insert(e.name.clone(), slot);
            self.by_id.insert(e.vdi_id, slot);
        }
        self.registry[slot] = block;
    }

    pub fn find(&self, name: &str) -> Option<(usize, RegistryEntry)> {
        let slot = *self.by_name.get(name)?;
        self.registry[slot]
            .as_ref()?
            .entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| (slot, e.clone()))
    }

    pub fn by_id(&self, vdi_id: u64) -> Option<RegistryEntry> {
        let slot = *self.by_id.get(&vdi_id)?;
        self.registry[slot]
            .as_ref()?
            .entries
            .iter()
            .find(|e| e.vdi_id == vdi_id)
            .cloned()
    }

    pub fn entries(&self) -> Vec<RegistryEntry> {
        self.registry
            .iter()
            .flatten()
            .flat_map(|b| b.entries.iter().cloned())
            .collect()
    }
}

fn random_id() -> u64 {
    let mut bytes = [0u8; 8];
    if let Ok(f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = (&f).read_exact(&mut bytes);
    }
    let id = u64::from_le_bytes(bytes) ^ now_ns().rotate_left(17) ^ u64::from(std::process::id());
    id.max(1)
}

/// Formats `dev` as an empty store with extents of `extent_data_blocks`
/// data blocks. Everything on it is lost.
pub(super) fn format(dev: &dyn BlockDevice, extent_data_blocks: u64) -> Result<()> {
    let d = extent_data_blocks;
    if d == 0 || d > BITMAP_BITS as u64 {
        return Err(Error::InvalidArgument(format!(
            "extent size must be 1..={BITMAP_BITS} data blocks"
        )));
    }
    let total_blocks = (dev.len() / BLOCK_SIZE_U64).min(parallax_format::MAX_BLOCK_ADDR);
    let avail = total_blocks.saturating_sub(2);
    let extent_count = avail / (d + 2) + u64::from(avail % (d + 2) >= 3);
    if extent_count == 0 || total_blocks < 16 {
        return Err(Error::InvalidArgument(format!(
            "a device of {} bytes is too small for a store",
            dev.len()
        )));
    }
    let sb = Superblock {
        store_id: random_id(),
        generation: 1,
        total_blocks,
        extent_data_blocks: d,
        extent_count,
        first_extent: 2,
        next_vdi_id: 1,
        created_ns: now_ns(),
        write_log_id: 0,
        write_log_locator: 0,
        registry: vec![Ptr::NULL; SUPERBLOCK_REGISTRY_SLOTS],
        journaled: false,
    };
    let io = Error::io("formatting the store");
    // Invalidate any previous store first: once both old superblocks are
    // gone, a power cut during formatting leaves "not a store", never an
    // old store whose bitmaps were half rewritten.
    let zeros = vec![0u8; 2 * BLOCK_SIZE];
    dev.write_at(&zeros, 0)
        .and_then(|_| dev.flush())
        .map_err(Error::io("formatting the store"))?;
    // Clear bitmap slots left by whatever was on the device before.
    for e in 0..extent_count {
        dev.write_at(&zeros, sb.extent_start(e) * BLOCK_SIZE_U64)
            .map_err(Error::io("formatting the store"))?;
    }
    // A valid, empty, unowned bitmap in slot A of every extent.
    for e in 0..extent_count {
        let mut bm = BitmapBlock::empty(e, sb.extent_len(e));
        bm.generation = 1;
        let addr = sb.extent_start(e);
        let (b, _) = bm.encode(sb.store_id, addr);
        dev.write_at(&b[..], addr * BLOCK_SIZE_U64)
            .map_err(Error::io("formatting the store"))?;
    }
    dev.flush().map_err(Error::io("formatting the store"))?;
    for &addr in &SUPERBLOCK_ADDRS {
        let (b, _) = sb.encode(addr);
        dev.write_at(&b[..], addr * BLOCK_SIZE_U64)
            .map_err(Error::io("formatting the store"))?;
    }
    dev.flush().map_err(io)?;
    Ok(())
}

pub(super) fn read_superblocks(dev: &dyn BlockDevice) -> Result<(Superblock, usize)> {
    if dev.len() < 3 * BLOCK_SIZE_U64 {
        return Err(Error::NotAStore(format!(
            "the device is only {} bytes",
            dev.len()
        )));
    }
    let mut copies = Vec::new();
    let mut errors = Vec::new();
    for (slot, &addr) in SUPERBLOCK_ADDRS.iter().enumerate() {
        let mut b = vec![0u8; BLOCK_SIZE];
        dev.read_at(&mut b, addr * BLOCK_SIZE_U64)
            .map_err(Error::io("reading the superblock"))?;
        match Superblock::decode(&b, addr) {
            Ok(sb) => copies.push((sb, slot)),
            Err(e) => errors.push((b[0..4] == MAGIC, e)),
        }
    }
    if let Some(best) = copies.into_iter().max_by_key(|(sb, _)| sb.generation) {
        return Ok(best);
    }
    if let Some((_, FormatError::NewerVersion { found, .. })) = errors
        .iter()
        .find(|(_, e)| matches!(e, FormatError::NewerVersion { .. }))
    {
        return Err(Error::NewerVersion {
            found: *found,
            supported: FORMAT_VERSION,
        });
    }
    if errors.iter().all(|(magic, _)| !magic) {
        return Err(Error::NotAStore("no Parallax superblock found".into()));
    }
    let detail = errors
        .into_iter()
        .map(|(_, e)| e.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    Err(Error::Inconsistent(format!(
        "both superblock copies are damaged: {detail}"
    )))
}
/// Reads both header copies (A, B) of a disk: each decoded, or why not.
pub(crate) fn read_header_copies(
    pool: &Pool,
    entry: &RegistryEntry,
) -> Result<[std::result::Result<VdiHeader, String>; 2]> {
    let meta = pool.meta();
    let read = |addr: u64| -> Result<std::result::Result<VdiHeader, String>> {
        let raw = meta.read_block(addr, "a VDI header")?;
        Ok(
            match VdiHeader::decode(&raw[..], addr, Some(meta.store_id)) {
                Ok(h) if h.vdi_id == entry.vdi_id => Ok(h),
                Ok(h) => Err(format!(
                    "block {addr} holds the header of disk id {}",
                    h.vdi_id
                )),
                Err(e) => Err(e.to_string()),
            },
        )
    };
    Ok([read(entry.header_a)?, read(entry.header_b)?])
}

/// Which of two valid header copies is the disk's state: the one of the
/// newer writer epoch, then the newer generation. A commit an older writer
/// finished after a newer writer's (a holder that lost its lease with a
/// header write in flight) is ignored even if its generation is higher
/// (`check` reports it). Epochs never go down (a commit without a
/// coordinator keeps the header's), so without a cluster this is the
/// newer generation.
pub(crate) fn newer_header(a: &VdiHeader, b: &VdiHeader) -> bool {
    (a.writer_epoch, a.generation) > (b.writer_epoch, b.generation)
}

/// Reads both header copies of a disk and returns the newest valid one
/// ([`newer_header`]).
pub(crate) fn read_vdi_header(pool: &Pool, entry: &RegistryEntry) -> Result<(VdiHeader, usize)> {
    let mut best: Option<(VdiHeader, usize)> = None;
    let mut errors = Vec::new();
    for (slot, copy) in read_header_copies(pool, entry)?.into_iter().enumerate() {
        match copy {
            Ok(h) => {
                if best.as_ref().is_none_or(|(b, _)| newer_header(&h, b)) {
                    best = Some((h, slot));
                }
            }
            Err(e) => errors.push(e),
        }
    }
    let (header, slot) = best.ok_or_else(|| {
        Error::Inconsistent(format!(
            "disk {}: no valid header copy ({})",
            entry.name,
            errors.join("; ")
        ))
    })?;
    pool.meta().check_ptr(header.root, "a VDI root")?;
    Ok((header, slot))
}

impl Store {
    /// Creates an empty disk of `size` bytes (rounded up to 4 KiB).
    pub fn create_vdi(&self, name: &str, size: u64) -> Result<Vdi> {
        let size = size
            .checked_next_multiple_of(BLOCK_SIZE_U64)
            .filter(|s| *s > 0 && *s <= MAX_VDI_SIZE)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "disk size {size} must be between 1 byte and {MAX_VDI_SIZE} bytes"
                ))
            })?;
        let mut catalog = self.catalog()?;
        self.create_with_tree(
            &mut catalog,
            name,
            size,
            Tree::empty(),
            Origin::None,
            0,
            0,
            String::new(),
        )
    }

    /// Clones snapshot `snapshot` of disk `disk` into a new writable disk
    /// `new_name`, in O(1): the new root points at the snapshot's subtrees,
    /// shared. The origin stays usable and independent.
    ///
    /// In shared mode, the origin disk is not opened if this host does not
    /// have it open (another host may write it): the snapshot is read from
    /// its committed log under the catalogue lock, which also keeps its
    /// holder from reclaiming it until the clone is registered. The
    /// catalogue commit flushes the pool before its superblock, so the
    /// snapshot's commit is durable before the clone can be found.
    pub fn clone_snapshot(&self, disk: &str, snapshot: &str, new_name: &str) -> Result<Vdi> {
        let mut catalog = self.catalog()?;
        let (_, entry) = catalog
            .find(disk)
            .ok_or_else(|| Error::NotFound(format!("disk {disk} does not exist")))?;
        let held = self.inner.open.lock().contains_key(&entry.vdi_id);
        if self.is_shared() && !held {
            let snap = self.committed_snapshot(&entry, snapshot)?;
            return self.register_clone(&mut catalog, &entry, &snap, snapshot, new_name);
        }
        let origin = self.open_entry(&catalog, &entry)?;
        // The clone's header must never land before the snapshot it builds
        // on: the origin's commit lock, once every commit adopted is
        // durable, is held until the clone is registered (a deferred
        // snapshot is durable first).
        let _durable = origin.disk().durable()?;
        // The origin's lock, held shared until the clone is registered,
        // keeps the snapshot from being reclaimed in between.
        let origin_state = origin.disk().read_state()?;
        let snap = origin_state
            .snapshots()
            .by_name(snapshot)
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "snapshot {} does not exist",
                    DiskRef::snapshot(disk, snapshot)
                ))
            })?;
        self.register_clone(&mut catalog, &entry, &snap, snapshot, new_name)
    }

    /// Registers `new_name`, a clone of snapshot `snap` (named `snapshot`)
    /// of disk `origin`, and counts it.
    fn register_clone(
        &self,
        catalog: &mut Catalog,
        origin: &RegistryEntry,
        snap: &crate::lineage::SnapshotInfo,
        snapshot: &str,
        new_name: &str,
    ) -> Result<Vdi> {
        // The clone's tree is its own from the start (a journal snapshot's
        // records are set in its first nodes); its journal starts empty.
        let pool = &self.inner.pool;
        let tree = crate::disk::tree_from_snapshot(pool, origin.vdi_id, snap, pool.journal_mode())?;
        let vdi = self.create_with_tree(
            catalog,
            new_name,
            snap.size_bytes,
            tree,
            Origin::Root {
                root: snap.root,
                journal: snap.journal,
                created_ns: snap.created_ns,
            },
            origin.vdi_id,
            snap.id,
            DiskRef::snapshot(&origin.name, snapshot).to_string(),
        )?;
        self.inner.pool.add_clone(origin.vdi_id, snap.id);
        Ok(vdi)
    }

    #[allow(clippy::too_many_arguments)]
    fn create_with_tree(
        &self,
        catalog: &mut Catalog,
        name: &str,
        size: u64,
        tree: Tree,
        origin_root: Origin,
        origin_vdi: u64,
        origin_snapshot: u64,
        origin: String,
    ) -> Result<Vdi> {
        validate_name(name).map_err(Error::InvalidArgument)?;
        let pool = &*self.inner.pool;
        let meta = pool.meta();
        if catalog.poisoned {
            return Err(Error::Poisoned("the store catalogue".into()));
        }
        if catalog.find(name).is_some() {
            return Err(Error::AlreadyExists(format!("disk {name} already exists")));
        }
        let slot = pick_registry_slot(catalog)?;
        let vdi_id = catalog.sb.next_vdi_id;
        let mut allocated = Vec::new();
        // The header written to slot A (the newer of the two).
        let mut newest = None;
        let result = (|| -> Result<(RegistryEntry, Vec<NewBlock>)> {
            let mut allocate = || pool.allocate(0);
            let header_a = allocate()?;
            allocated.push(header_a);
            let header_b = allocate()?;
            allocated.push(header_b);
            // Headers, root and registry block go out in one batch.
            let mut blocks = Vec::new();
            let plan =
                tree.write_dirty(meta, vdi_id, 1, &mut allocate, &mut allocated, &mut blocks)?;
            let mut header = VdiHeader {
                vdi_id,
                generation: 1,
                size_bytes: size,
                root: plan.root,
                log_head: Ptr::NULL,
                snapshot_count: 0,
                next_snapshot_id: 1,
                created_ns: now_ns(),
                origin_vdi,
                origin_snapshot,
                name: name.to_string(),
                origin,
                flags: VDI_FLAG_LINEAGE,
                live_parent: 0,
                schedule: Default::default(),
                writer_epoch: 0,
                writer_host: 0,
                cache_policy: Default::default(),
                journal_head: Ptr::NULL,
            };
            let (b, _) = header.encode(meta.store_id, header_a);
            blocks.push((header_a, b));
            newest = Some(header.clone());
            header.generation = 0;
            let (b, _) = header.encode(meta.store_id, header_b);
            blocks.push((header_b, b));
            let entry = RegistryEntry {
                vdi_id,
                header_a,
                header_b,
                name: name.to_string(),
            };
            Ok((entry, blocks))
        })();
        let (entry, blocks) = match result {
            Ok(r) => r,
            Err(e) => {
                pool.free(&allocated);
                return Err(e);
            }
        };
        let mut block = catalog.registry[slot].clone().unwrap_or_default();
        block.entries.push(entry.clone());
        let what = "a new disk's headers, root and registry block";
        let old =
            replace_registry_slot(pool, catalog, slot, block, blocks, allocated, what, |sb| {
                sb.next_vdi_id += 1
            })?;
        pool.free(&old.into_iter().collect::<Vec<_>>());
        match newest {
            // Opened from the header just written rather than read back
            // (shared mode: through the writer key, like any open).
            Some(header) if !self.is_shared() => {
                let disk = Arc::new(Disk::open(
                    self.inner.pool.clone(),
                    [entry.header_a, entry.header_b],
                    header,
                    1,
                    entry.name.clone(),
                    origin_root,
                    0,
                )?);
                Ok(self.handle(self.adopt(disk)))
            }
            _ => self.open_entry(catalog, &entry),
        }
    }

    /// Deletes a disk and its snapshots. Open handles to it fail from now
    /// on. Refused while clones made from its snapshots exist (delete them
    /// first), as ZFS and RBD do. Everything the disk held that its origin
    /// does not returns to the free pool once the deletion is durable.
    pub fn delete_vdi(&self, name: &str) -> Result<()> {
        let pool = &*self.inner.pool;
        let mut catalog = self.catalog()?;
        if catalog.poisoned {
            return Err(Error::Poisoned("the store catalogue".into()));
        }
        let (slot, entry) = catalog
            .find(name)
            .ok_or_else(|| Error::NotFound(format!("disk {name} does not exist")))?;
        if pool.has_clones(entry.vdi_id) {
            let clones = self.clone_names_in(&catalog, entry.vdi_id);
            return Err(Error::Busy(format!(
                "disk {name} has clones ({}); delete them first",
                clones.join(", ")
            )));
        }
        self.refuse_if_pinned(&entry)?;
        let vdi = self.open_entry(&catalog, &entry)?;
        let disk = vdi.disk().clone();
        let mut st = disk.exclusive()?;
        // Views of its snapshots on this host (under the state lock, which
        // a new view takes too).
        let read = disk.pins.lock().len();
        if read > 0 {
            return Err(Error::Busy(format!(
                "disk {name}: {read} of its snapshots are being read; close those exports first"
            )));
        }
        let mut freed: HashSet<u64> = disk.disk_blocks(&st)?.into_iter().collect();
        let old = remove_entry(pool, &mut catalog, slot, entry.vdi_id)?;
        st.mark_deleted();
        let (origin_vdi, origin_snap) = (st.origin_vdi(), st.origin_snapshot());
        drop(st);
        if let Some(d) = self.inner.open.lock().remove(&entry.vdi_id) {
            d.release_writer();
        }
        freed.extend(old);
        pool.free(&freed.into_iter().collect::<Vec<_>>());
        if origin_vdi != 0 {
            pool.remove_clone(origin_vdi, origin_snap);
            // The origin snapshot lost a clone: if it was deleted (hidden),
            // it may now be reclaimed. The deletion is done: a failure here
            // (the origin held by another host, an I/O error) only leaves
            // the hidden snapshot for a later reclamation pass of its disk.
            // Shared mode: only if this host has the origin open (its
            // writer key is not taken for this), with the catalogue lock
            // still held and the cluster's pins in hand.
            if let Some(o) = catalog.by_id(origin_vdi) {
                let _ = (|| -> Result<()> {
                    let pinned = match pool.coordinator() {
                        Some(c) if self.inner.open.lock().contains_key(&o.vdi_id) => {
                            Some(c.pinned_snapshots(o.vdi_id)?)
                        }
                        Some(_) => return Ok(()),
                        None => None,
                    };
                    let o = self.open_entry(&catalog, &o)?;
                    let holds = match &pinned {
                        Some(p) => Holds::Cluster(p),
                        None => {
                            drop(catalog);
                            Holds::Local
                        }
                    };
                    let mut ost = o.disk().exclusive()?;
                    if ost.snapshots().get(origin_snap).is_some_and(|s| s.hidden) {
                        o.disk().delete_versions(&mut ost, &[], holds)?;
                    }
                    Ok(())
                })();
            }
        }
        Ok(())
    }

    /// Names of the disks cloned from snapshots of disk `vdi_id`.
    pub(crate) fn clone_names(&self, vdi_id: u64) -> Result<Vec<String>> {
        let catalog = self.catalog()?;
        Ok(self.clone_names_in(&catalog, vdi_id))
    }

    fn clone_names_in(&self, catalog: &Catalog, vdi_id: u64) -> Vec<String> {
        catalog
            .entries()
            .into_iter()
            .filter(|e| {
                read_vdi_header(&self.inner.pool, e).is_ok_and(|(h, _)| h.origin_vdi == vdi_id)
            })
            .map(|e| e.name)
            .collect()
    }
}

/// Removes disk `vdi_id` from registry slot `slot` and commits the
/// superblock. Returns the registry block to free (its old location).
pub(super) fn remove_entry(
    pool: &Pool,
    catalog: &mut Catalog,
    slot: usize,
    vdi_id: u64,
) -> Result<Option<u64>> {
    let mut block = catalog.registry[slot].clone().unwrap_or_default();
    block.entries.retain(|e| e.vdi_id != vdi_id);
    let what = "a registry block";
    replace_registry_slot(
        pool,
        catalog,
        slot,
        block,
        Vec::new(),
        Vec::new(),
        what,
        |_| {},
    )
}

/// A block to write: its address and content.
type NewBlock = (u64, Box<Block>);

/// The end of every catalogue change: registry slot `slot` becomes `block`
/// (written to a new location together with the change's other new
/// `blocks`; an empty block clears the slot), then the superblock, edited
/// by `edit`, is committed. `allocated`: the blocks the change allocated,
/// given back if it fails. Returns the slot's old block, to free.
#[allow(clippy::too_many_arguments)]
fn replace_registry_slot(
    pool: &Pool,
    catalog: &mut Catalog,
    slot: usize,
    block: RegistryBlock,
    mut blocks: Vec<NewBlock>,
    mut allocated: Vec<u64>,
    what: &str,
    edit: impl FnOnce(&mut Superblock),
) -> Result<Option<u64>> {
    let written = if block.entries.is_empty() {
        let old = catalog.sb.registry[slot];
        pool.meta()
            .write_many(blocks, what)
            .map(|_| (Ptr::NULL, (!old.is_null()).then(|| old.addr())))
    } else {
        write_registry_block(pool, catalog, slot, &block, &mut allocated, &mut blocks).and_then(
            |r| {
                pool.meta().write_many(blocks, what)?;
                Ok(r)
            },
        )
    };
    let (ptr, old) = match written {
        Ok(r) => r,
        Err(e) => {
            pool.free(&allocated);
            return Err(e);
        }
    };
    let mut sb = catalog.sb.clone();
    sb.registry[slot] = ptr;
    edit(&mut sb);
    commit_superblock(pool, catalog, sb, &allocated)?;
    catalog.set_slot(slot, (!block.entries.is_empty()).then_some(block));
    Ok(old)
}

fn pick_registry_slot(catalog: &Catalog) -> Result<usize> {
    let partly = catalog.registry.iter().position(|b| {
        b.as_ref()
            .is_some_and(|b| b.entries.len() < REGISTRY_ENTRIES_PER_BLOCK)
    });
    partly
        .or_else(|| catalog.registry.iter().position(Option::is_none))
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "the store holds the maximum of {} disks",
                SUPERBLOCK_REGISTRY_SLOTS * REGISTRY_ENTRIES_PER_BLOCK
            ))
        })
}

/// Encodes `block` into `out` as the new content of registry slot `slot`
/// in a new location (the caller writes it). Returns its pointer and the old location to free after commit.
fn write_registry_block(
    pool: &Pool,
    catalog: &Catalog,
    slot: usize,
    block: &RegistryBlock,
    allocated: &mut Vec<u64>,
    out: &mut Vec<(u64, Box<Block>)>,
) -> Result<(Ptr, Option<u64>)> {
    let addr = pool.allocate(0)?;
    allocated.push(addr);
    let (b, crc) = block.encode(pool.meta().store_id, addr, catalog.sb.generation + 1);
    out.push((addr, b));
    let old = catalog.sb.registry[slot];
    Ok((
        Ptr::meta(addr, crc, false),
        (!old.is_null()).then(|| old.addr()),
    ))
}

/// Writes the superblock again naming no write-back log, outside any open
/// store (the next generation, into the other copy, then a flush).
pub(super) fn clear_write_log(dev: &dyn BlockDevice) -> Result<()> {
    let (mut sb, slot) = read_superblocks(dev)?;
    sb.write_log_id = 0;
    sb.write_log_locator = 0;
    sb.generation += 1;
    let addr = SUPERBLOCK_ADDRS[1 - slot];
    let (b, _) = sb.encode(addr);
    dev.write_at(&b[..], addr * BLOCK_SIZE_U64)
        .and_then(|_| dev.flush())
        .map_err(Error::io("writing the superblock"))
}

/// Whether both superblock copies are intact and say the store is
/// journaled (format 2).
pub(super) fn both_superblocks_journaled(dev: &dyn BlockDevice) -> bool {
    SUPERBLOCK_ADDRS.iter().all(|&addr| {
        let mut b = vec![0u8; BLOCK_SIZE];
        dev.read_at(&mut b, addr * BLOCK_SIZE_U64).is_ok()
            && Superblock::decode(&b, addr).is_ok_and(|sb| sb.journaled)
    })
}

/// Makes `sb` (with generation bumped here) the durable superblock.
/// `allocated` are the blocks the change allocated, released on failure.
pub(super) fn commit_superblock(
    pool: &Pool,
    catalog: &mut Catalog,
    mut sb: Superblock,
    allocated: &[u64],
) -> Result<()> {
    if let Err(e) = pool.sync_bitmaps() {
        pool.free(allocated);
        return Err(e);
    }
    sb.generation += 1;
    let addr = SUPERBLOCK_ADDRS[catalog.next_sb_slot];
    let (b, _) = sb.encode(addr);
    // Shared mode with a write-back log: the superblock goes to the pool
    // around the log, after everything before it (other hosts read it
    // there; a record of it replayed later would undo their changes).
    let written = pool.write_through(addr, &b, "the superblock");
    if let Err(e) = written {
        catalog.poisoned = true;
        return Err(e);
    }
    catalog.next_sb_slot = 1 - catalog.next_sb_slot;
    catalog.sb = sb;
    Ok(())
}
