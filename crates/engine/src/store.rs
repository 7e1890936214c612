//! The block store: superblock, registry of disks, allocation, and the
//! operations that change the catalogue (create, clone, delete).
//!
//! Catalogue changes are committed through the superblock: the registry
//! block that changes is copied to a new block, the bitmaps are synced and
//! flushed, then the superblock copy with the lower generation is
//! overwritten and flushed. Per-disk commits never touch the superblock
//! (see `vdi.rs`), so several hosts will be able to commit their own disks
//! independently and take a store-wide lock only for catalogue changes.

use crate::alloc::Allocator;
use crate::error::{Error, Result};
use crate::meta::{MetaIo, DEFAULT_CACHE_NODES};
use crate::time::now_ns;
use crate::tree::Tree;
use crate::vdi::{read_log_chain, Origin, SnapshotView, Vdi, VdiInner, MAX_VDI_SIZE};
use parallax_device::BlockDevice;
use parallax_format::{
    validate_name, BitmapBlock, Block, FormatError, Ptr, RegistryBlock, RegistryEntry, Superblock,
    VdiHeader, BITMAP_BITS, BLOCK_SIZE, BLOCK_SIZE_U64, FORMAT_VERSION, MAGIC,
    REGISTRY_ENTRIES_PER_BLOCK, SUPERBLOCK_ADDRS, SUPERBLOCK_REGISTRY_SLOTS, VDI_FLAG_LINEAGE,
};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};

/// Options for [`Store::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Data blocks per extent (at most 31744, the default: 124 MiB).
    pub extent_data_blocks: u64,
    pub host_id: u64,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            extent_data_blocks: BITMAP_BITS as u64,
            host_id: 1,
        }
    }
}

/// Options for [`Store::open`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// This appliance's host id: it allocates only from extents it owns.
    pub host_id: u64,
    /// Tree nodes kept in the cache.
    pub cache_nodes: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            host_id: 1,
            cache_nodes: DEFAULT_CACHE_NODES,
        }
    }
}

/// Space figures of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStats {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
}

pub(crate) struct Catalog {
    pub sb: Superblock,
    /// Superblock copy the next catalogue commit writes.
    next_sb_slot: usize,
    /// Decoded registry blocks, parallel to `sb.registry`.
    pub registry: Vec<Option<RegistryBlock>>,
    poisoned: bool,
}

impl Catalog {
    pub fn find(&self, name: &str) -> Option<(usize, RegistryEntry)> {
        self.registry.iter().enumerate().find_map(|(i, b)| {
            b.as_ref()?
                .entries
                .iter()
                .find(|e| e.name == name)
                .map(|e| (i, e.clone()))
        })
    }

    pub fn entries(&self) -> Vec<RegistryEntry> {
        self.registry
            .iter()
            .flatten()
            .flat_map(|b| b.entries.iter().cloned())
            .collect()
    }
}

pub(crate) struct StoreInner {
    pub meta: MetaIo,
    pub alloc: Mutex<Allocator>,
    /// Held from planning a bitmap write to the flush that makes it durable.
    sync_lock: Mutex<()>,
    pub catalog: Mutex<Catalog>,
    open: Mutex<HashMap<u64, Weak<VdiInner>>>,
    /// (origin disk id, snapshot id) ─▶ clones made from it that exist.
    /// Built when the store opens; a leaf lock (nothing is taken under it).
    clones: Mutex<HashMap<(u64, u64), usize>>,
    /// While `gc` marks: blocks freed meanwhile, held back from the
    /// allocator so that nothing the mark may still read is reused.
    pub(crate) deferred_frees: Mutex<Option<Vec<u64>>>,
}

impl StoreInner {
    /// Writes changed bitmaps to their next slots and flushes the device:
    /// after this, every allocation and every release made so far is durable.
    pub fn sync_bitmaps(&self) -> Result<()> {
        self.sync(false)
    }

    /// [`StoreInner::sync_bitmaps`] for the extents where blocks were
    /// allocated: what a commit needs before its header (I2). Extents that
    /// only had blocks released wait for the next full sync (the daemon's
    /// settle tick, `flush_all`), so a commit writes one or two bitmaps,
    /// not one per extent its frees touched.
    pub fn sync_allocations(&self) -> Result<()> {
        self.sync(true)
    }

    fn sync(&self, allocations_only: bool) -> Result<()> {
        let _sync = self.sync_lock.lock();
        let plan = self.alloc.lock().plan_sync(allocations_only);
        let result = plan
            .iter()
            .try_for_each(|w| self.meta.write_block(w.addr, &w.block, "an extent bitmap"))
            .and_then(|_| self.meta.flush());
        self.alloc.lock().finish_sync(&plan, result.is_ok());
        result
    }

    /// How many disks were cloned from snapshot `snap` of disk `vdi`.
    pub fn clone_count(&self, vdi: u64, snap: u64) -> usize {
        self.clones.lock().get(&(vdi, snap)).copied().unwrap_or(0)
    }

    pub(crate) fn has_clones(&self, vdi: u64) -> bool {
        self.clones.lock().keys().any(|&(v, _)| v == vdi)
    }

    fn add_clone(&self, vdi: u64, snap: u64) {
        *self.clones.lock().entry((vdi, snap)).or_insert(0) += 1;
    }

    fn remove_clone(&self, vdi: u64, snap: u64) {
        let mut clones = self.clones.lock();
        if let Some(n) = clones.get_mut(&(vdi, snap)) {
            *n -= 1;
            if *n == 0 {
                clones.remove(&(vdi, snap));
            }
        }
    }

    /// Returns blocks allocated in memory but never written nor referenced
    /// (no commit can have made them durable): at once, even while `gc`
    /// defers frees.
    pub fn release_unreferenced(&self, blocks: &[u64]) {
        if blocks.is_empty() {
            return;
        }
        let mut alloc = self.alloc.lock();
        for &b in blocks {
            alloc.release(b);
        }
    }

    /// Returns blocks that durable metadata no longer references.
    pub fn release(&self, blocks: &[u64]) {
        if let Some(deferred) = self.deferred_frees.lock().as_mut() {
            deferred.extend_from_slice(blocks);
            return;
        }
        let mut alloc = self.alloc.lock();
        for &b in blocks {
            self.meta.evict(b);
            alloc.release(b);
        }
    }
}

/// An open store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<StoreInner>,
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

fn read_superblocks(dev: &dyn BlockDevice) -> Result<(Superblock, usize)> {
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

impl Store {
    /// Formats `dev` as an empty store. Everything on it is lost.
    pub fn create(dev: Arc<dyn BlockDevice>, options: &CreateOptions) -> Result<Store> {
        let d = options.extent_data_blocks;
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
            registry: vec![Ptr::NULL; SUPERBLOCK_REGISTRY_SLOTS],
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
        Store::open(
            dev,
            &OpenOptions {
                host_id: options.host_id,
                ..OpenOptions::default()
            },
        )
    }

    /// Opens an existing store. Never repairs anything: a store that was
    /// cut off at any instant opens as it is.
    pub fn open(dev: Arc<dyn BlockDevice>, options: &OpenOptions) -> Result<Store> {
        let (sb, slot) = read_superblocks(&*dev)?;
        if dev.len() < sb.total_blocks * BLOCK_SIZE_U64 {
            return Err(Error::Inconsistent(format!(
                "the store needs {} bytes but the device has only {}",
                sb.total_blocks * BLOCK_SIZE_U64,
                dev.len()
            )));
        }
        let meta = MetaIo::new(
            dev.clone(),
            sb.store_id,
            sb.total_blocks,
            options.cache_nodes,
        );
        let mut registry = Vec::with_capacity(sb.registry.len());
        for (i, p) in sb.registry.iter().enumerate() {
            if p.is_null() {
                registry.push(None);
                continue;
            }
            let raw = meta.read_block(p.addr(), "a registry block")?;
            let (block, crc) = RegistryBlock::decode(&raw[..], p.addr(), Some(sb.store_id))?;
            if !p.matches_crc(crc) {
                return Err(FormatError::Stale {
                    addr: p.addr(),
                    found: crc & 0x7f_ffff,
                    expected: p.check(),
                }
                .into());
            }
            for e in &block.entries {
                for h in [e.header_a, e.header_b] {
                    meta.check_ptr(Ptr::data(h.max(1), false), &format!("registry slot {i}"))?;
                }
            }
            registry.push(Some(block));
        }
        let alloc = Allocator::load(&*dev, &sb, options.host_id)?;
        let store = Store {
            inner: Arc::new(StoreInner {
                meta,
                alloc: Mutex::new(alloc),
                sync_lock: Mutex::new(()),
                catalog: Mutex::new(Catalog {
                    sb,
                    next_sb_slot: 1 - slot,
                    registry,
                    poisoned: false,
                }),
                open: Mutex::new(HashMap::new()),
                clones: Mutex::new(HashMap::new()),
                deferred_frees: Mutex::new(None),
            }),
        };
        // Which snapshots clones hang from: reclamation must keep them.
        let entries = store.inner.catalog.lock().entries();
        for e in entries {
            // A disk whose headers cannot be read fails when it is opened;
            // it cannot be counted here.
            if let Ok((h, _)) = store.read_vdi_header(&e) {
                if h.origin_vdi != 0 {
                    store.inner.add_clone(h.origin_vdi, h.origin_snapshot);
                }
            }
        }
        Ok(store)
    }

    /// The store's random id.
    pub fn store_id(&self) -> u64 {
        self.inner.meta.store_id
    }

    /// Names of all disks, sorted.
    pub fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .catalog
            .lock()
            .entries()
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        names
    }

    pub fn stats(&self) -> StoreStats {
        let (total, used) = self.inner.alloc.lock().totals();
        StoreStats {
            capacity_bytes: total * BLOCK_SIZE_U64,
            used_bytes: used * BLOCK_SIZE_U64,
            free_bytes: (total - used) * BLOCK_SIZE_U64,
        }
    }

    /// Opens a writable disk. Handles to one disk share its state.
    pub fn open_vdi(&self, name: &str) -> Result<Vdi> {
        let catalog = self.inner.catalog.lock();
        let (_, entry) = catalog
            .find(name)
            .ok_or_else(|| Error::NotFound(format!("disk {name} does not exist")))?;
        self.open_entry(&catalog, &entry)
    }

    /// Opens the disk of a registry entry; the caller holds the catalogue.
    fn open_entry(&self, catalog: &Catalog, entry: &RegistryEntry) -> Result<Vdi> {
        if let Some(inner) = self
            .inner
            .open
            .lock()
            .get(&entry.vdi_id)
            .and_then(Weak::upgrade)
        {
            return Ok(Vdi { inner });
        }
        let (header, slot) = self.read_vdi_header(entry)?;
        let origin = if header.origin_vdi == 0 {
            Origin::None
        } else {
            // The origin disk outlives its clones (deleting it is refused
            // while they exist), and the snapshot stays, hidden if deleted.
            let origin = catalog
                .entries()
                .into_iter()
                .find(|e| e.vdi_id == header.origin_vdi);
            match origin {
                Some(o) => {
                    let o = self.open_entry(catalog, &o)?;
                    let st = o.inner.state.read();
                    match st.snapshots.get(header.origin_snapshot) {
                        Some(s) => Origin::Root(s.root),
                        None => Origin::Unknown,
                    }
                }
                None => Origin::Unknown,
            }
        };
        let mut open = self.inner.open.lock();
        if let Some(inner) = open.get(&entry.vdi_id).and_then(Weak::upgrade) {
            return Ok(Vdi { inner });
        }
        let inner = Arc::new(VdiInner::new(
            self.inner.clone(),
            [entry.header_a, entry.header_b],
            header,
            1 - slot,
            entry.name.clone(),
            origin,
        )?);
        open.insert(entry.vdi_id, Arc::downgrade(&inner));
        Ok(Vdi { inner })
    }

    /// Reads both header copies of a disk and returns the newest valid one.
    pub(crate) fn read_vdi_header(&self, entry: &RegistryEntry) -> Result<(VdiHeader, usize)> {
        let meta = &self.inner.meta;
        let mut best: Option<(VdiHeader, usize)> = None;
        let mut errors = Vec::new();
        for (slot, addr) in [entry.header_a, entry.header_b].into_iter().enumerate() {
            let raw = meta.read_block(addr, "a VDI header")?;
            match VdiHeader::decode(&raw[..], addr, Some(meta.store_id)) {
                Ok(h) if h.vdi_id == entry.vdi_id => {
                    if best
                        .as_ref()
                        .is_none_or(|(b, _)| h.generation > b.generation)
                    {
                        best = Some((h, slot));
                    }
                }
                Ok(h) => errors.push(format!(
                    "block {addr} holds the header of disk id {}",
                    h.vdi_id
                )),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let (header, slot) = best.ok_or_else(|| {
            Error::Inconsistent(format!(
                "disk {}: no valid header copy ({})",
                entry.name,
                errors.join("; ")
            ))
        })?;
        meta.check_ptr(header.root, "a VDI root")?;
        Ok((header, slot))
    }

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
        let mut catalog = self.inner.catalog.lock();
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
    pub fn clone_snapshot(&self, disk: &str, snapshot: &str, new_name: &str) -> Result<Vdi> {
        let mut catalog = self.inner.catalog.lock();
        let (_, entry) = catalog
            .find(disk)
            .ok_or_else(|| Error::NotFound(format!("disk {disk} does not exist")))?;
        let origin = self.open_entry(&catalog, &entry)?;
        // The origin's lock, held shared until the clone is registered,
        // keeps the snapshot from being reclaimed in between.
        let origin_state = origin.inner.state.read();
        let snap = origin_state
            .snapshots
            .by_name(snapshot)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("snapshot {disk}@{snapshot} does not exist")))?;
        let tree = Tree::shared_copy(&self.inner.meta, snap.root)?;
        let vdi = self.create_with_tree(
            &mut catalog,
            new_name,
            snap.size_bytes,
            tree,
            Origin::Root(snap.root),
            origin.id(),
            snap.id,
            format!("{disk}@{snapshot}"),
        )?;
        self.inner.add_clone(origin.id(), snap.id);
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
        let inner = &*self.inner;
        let meta = &inner.meta;
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
        let result = (|| -> Result<(RegistryEntry, Ptr, Option<u64>, RegistryBlock)> {
            let mut allocate = || inner.alloc.lock().allocate(0);
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
            let mut block = catalog.registry[slot].clone().unwrap_or_default();
            block.entries.push(entry.clone());
            let (ptr, old) =
                write_registry_block(inner, catalog, slot, &block, &mut allocated, &mut blocks)?;
            meta.write_many(blocks, "a new disk's headers, root and registry block")?;
            Ok((entry, ptr, old, block))
        })();
        let (entry, ptr, old, block) = match result {
            Ok(r) => r,
            Err(e) => {
                inner.release(&allocated);
                return Err(e);
            }
        };
        let mut sb = catalog.sb.clone();
        sb.registry[slot] = ptr;
        sb.next_vdi_id += 1;
        commit_superblock(inner, catalog, sb, allocated)?;
        catalog.registry[slot] = Some(block);
        inner.release(&old.into_iter().collect::<Vec<_>>());
        match newest {
            // Opened from the header just written rather than read back.
            Some(header) => {
                let vdi = Arc::new(VdiInner::new(
                    self.inner.clone(),
                    [entry.header_a, entry.header_b],
                    header,
                    1,
                    entry.name.clone(),
                    origin_root,
                )?);
                inner.open.lock().insert(vdi_id, Arc::downgrade(&vdi));
                Ok(Vdi { inner: vdi })
            }
            None => self.open_entry(catalog, &entry),
        }
    }

    /// Deletes a disk and its snapshots. Open handles to it fail from now
    /// on. Refused while clones made from its snapshots exist (delete them
    /// first), as ZFS and RBD do. Everything the disk held that its origin
    /// does not returns to the free pool once the deletion is durable.
    pub fn delete_vdi(&self, name: &str) -> Result<()> {
        let inner = &*self.inner;
        let mut catalog = inner.catalog.lock();
        if catalog.poisoned {
            return Err(Error::Poisoned("the store catalogue".into()));
        }
        let (slot, entry) = catalog
            .find(name)
            .ok_or_else(|| Error::NotFound(format!("disk {name} does not exist")))?;
        if inner.has_clones(entry.vdi_id) {
            let clones = self.clone_names_in(&catalog, entry.vdi_id);
            return Err(Error::Busy(format!(
                "disk {name} has clones ({}); delete them first",
                clones.join(", ")
            )));
        }
        let vdi = self.open_entry(&catalog, &entry)?;
        let mut st = vdi.inner.exclusive()?;
        let mut freed: HashSet<u64> = vdi.inner.disk_blocks(&st)?.into_iter().collect();
        for (addr, _) in read_log_chain(inner, st.header.log_head, entry.vdi_id)? {
            freed.insert(addr);
        }
        freed.insert(entry.header_a);
        freed.insert(entry.header_b);
        let mut block = catalog.registry[slot].clone().unwrap_or_default();
        block.entries.retain(|e| e.vdi_id != entry.vdi_id);
        let mut allocated = Vec::new();
        let (ptr, old) = if block.entries.is_empty() {
            let old = catalog.sb.registry[slot].addr();
            (Ptr::NULL, Some(old))
        } else {
            let mut blocks = Vec::new();
            let written =
                write_registry_block(inner, &catalog, slot, &block, &mut allocated, &mut blocks)
                    .and_then(|r| {
                        inner.meta.write_many(blocks, "a registry block")?;
                        Ok(r)
                    });
            match written {
                Ok(r) => r,
                Err(e) => {
                    inner.release(&allocated);
                    return Err(e);
                }
            }
        };
        let mut sb = catalog.sb.clone();
        sb.registry[slot] = ptr;
        commit_superblock(inner, &mut catalog, sb, allocated)?;
        catalog.registry[slot] = (!block.entries.is_empty()).then_some(block);
        st.deleted = true;
        self.inner.open.lock().remove(&entry.vdi_id);
        freed.extend(old);
        inner.release(&freed.into_iter().collect::<Vec<_>>());
        let (origin_vdi, origin_snap) = (st.header.origin_vdi, st.header.origin_snapshot);
        drop(st);
        if origin_vdi != 0 {
            inner.remove_clone(origin_vdi, origin_snap);
            // The origin snapshot lost a clone: if it was deleted (hidden),
            // it may now be reclaimed.
            let origin = catalog
                .entries()
                .into_iter()
                .find(|e| e.vdi_id == origin_vdi);
            if let Some(o) = origin {
                let o = self.open_entry(&catalog, &o)?;
                drop(catalog);
                let mut ost = o.inner.exclusive()?;
                if ost.snapshots.get(origin_snap).is_some_and(|s| s.hidden) {
                    o.inner.delete_versions(&mut ost, &[])?;
                }
            }
        }
        Ok(())
    }

    /// Names of the disks cloned from snapshots of disk `vdi_id`.
    pub(crate) fn clone_names(&self, vdi_id: u64) -> Result<Vec<String>> {
        let catalog = self.inner.catalog.lock();
        Ok(self.clone_names_in(&catalog, vdi_id))
    }

    fn clone_names_in(&self, catalog: &Catalog, vdi_id: u64) -> Vec<String> {
        catalog
            .entries()
            .into_iter()
            .filter(|e| {
                self.read_vdi_header(e)
                    .is_ok_and(|(h, _)| h.origin_vdi == vdi_id)
            })
            .map(|e| e.name)
            .collect()
    }

    /// A read-only view of `disk@snapshot`.
    pub fn open_snapshot(&self, disk: &str, snapshot: &str) -> Result<SnapshotView> {
        self.open_vdi(disk)?.pinned_view(disk, snapshot)
    }

    pub(crate) fn open_handles(&self) -> Vec<Arc<VdiInner>> {
        let mut open: Vec<Arc<VdiInner>> = self
            .inner
            .open
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        open.sort_by_key(|v| v.id);
        open
    }

    /// Writes the extent bitmaps that changed, if any (then flushes the
    /// device), so that blocks freed by earlier commits are free on disk
    /// too, without committing any disk. Cheap when nothing changed: the
    /// daemon calls it periodically.
    pub fn settle_free_space(&self) -> Result<()> {
        if !self.inner.alloc.lock().has_dirty() {
            return Ok(());
        }
        self.inner.sync_bitmaps()
    }

    /// Flushes every open disk, then writes the bitmaps, so that blocks
    /// freed by earlier commits (which become free in memory at once) are
    /// free on disk too. Call before closing a store.
    pub fn flush_all(&self) -> Result<()> {
        for inner in self.open_handles() {
            Vdi { inner }.flush()?;
        }
        self.inner.sync_bitmaps()
    }
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
    inner: &StoreInner,
    catalog: &Catalog,
    slot: usize,
    block: &RegistryBlock,
    allocated: &mut Vec<u64>,
    out: &mut Vec<(u64, Box<Block>)>,
) -> Result<(Ptr, Option<u64>)> {
    let addr = inner.alloc.lock().allocate(0)?;
    allocated.push(addr);
    let (b, crc) = block.encode(inner.meta.store_id, addr, catalog.sb.generation + 1);
    out.push((addr, b));
    let old = catalog.sb.registry[slot];
    Ok((
        Ptr::meta(addr, crc, false),
        (!old.is_null()).then(|| old.addr()),
    ))
}

/// Makes `sb` (with generation bumped here) the durable superblock.
/// `allocated` are the blocks the change allocated, released on failure.
fn commit_superblock(
    inner: &StoreInner,
    catalog: &mut Catalog,
    mut sb: Superblock,
    allocated: Vec<u64>,
) -> Result<()> {
    if let Err(e) = inner.sync_bitmaps() {
        inner.release(&allocated);
        return Err(e);
    }
    sb.generation += 1;
    let addr = SUPERBLOCK_ADDRS[catalog.next_sb_slot];
    let (b, _) = sb.encode(addr);
    let written = inner
        .meta
        .write_block(addr, &b, "the superblock")
        .and_then(|_| inner.meta.flush());
    if let Err(e) = written {
        catalog.poisoned = true;
        return Err(e);
    }
    catalog.next_sb_slot = 1 - catalog.next_sb_slot;
    catalog.sb = sb;
    Ok(())
}
