//! The data path: reads and writes of a disk's blocks.
//!
//! - Reads, in-place writes and allocating whole-block writes take the disk
//!   lock shared. An allocating write gets its new blocks from the pool,
//!   writes their data with no disk lock held, and publishes them in
//!   `Fresh`, which every reader consults before the tree. Partial-block
//!   writes also take one of 64 stripe locks, so that read-modify-write
//!   cycles on one block do not interleave.
//! - Partial writes that must allocate, discards and every management
//!   operation take it exclusively (folding `Fresh` into the tree first).
//! - Whole mapped blocks move in runs of consecutive device addresses, one
//!   `read_at`/`write_at` per run, straight from or into the caller's buffer.
//!
//! Invariant: no reader ever sees a block that was not completely written,
//! and a block written in place is one the live tree owns alone (every
//! pointer on its path writable).

use crate::disk::cached::{CacheScope, Use};
use crate::disk::plan::Transfer;
use crate::disk::state::{Disk, DiskState, STRIPES};
use crate::disk::Extent;
use crate::error::{Error, Result};
use crate::pool::Pool;
use crate::tree::Tree;
use parallax_format::{Ptr, BLOCK_SIZE, BLOCK_SIZE_U64, FAN_OUT, TREE_HEIGHT};

/// Free blocks kept back from data writes for the metadata of the next commit.
const METADATA_RESERVE: u64 = 64;

/// Above this many fresh entries, the blocking write path folds them into
/// the tree on its way out, and allocating writes are no longer planned
/// (so that they take the blocking path).
pub(super) const FRESH_FOLD_AT: usize = 16384;

pub(super) fn check_io_range(size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "range {offset}+{len} is past the end of the disk ({size} bytes)"
        ))),
    }
}

/// Splits `[offset, offset+len)` into per-block pieces:
/// (virtual block, offset within block, byte range in the caller's buffer).
pub(super) fn pieces(
    offset: u64,
    len: usize,
) -> impl Iterator<Item = (u64, usize, std::ops::Range<usize>)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done as u64;
        let v = pos / BLOCK_SIZE_U64;
        let within = (pos % BLOCK_SIZE_U64) as usize;
        let n = (BLOCK_SIZE - within).min(len - done);
        let r = done..done + n;
        done += n;
        Some((v, within, r))
    })
}

impl Disk {
    /// Overrides tree answers for `first..` with fresh entries (owned,
    /// writable). The caller holds the lock shared.
    pub(super) fn overlay_fresh(&self, first: u64, entries: &mut [(Ptr, bool)]) {
        let fresh = self.fresh.lock();
        if fresh.map.is_empty() {
            return;
        }
        for (k, e) in entries.iter_mut().enumerate() {
            if let Some(&addr) = fresh.map.get(&(first + k as u64)) {
                *e = (Ptr::data(addr, true), true);
            }
        }
    }

    /// The tree's entries for `first..end`, fresh writes included.
    pub(super) fn entries(&self, st: &DiskState, first: u64, end: u64) -> Result<Vec<(Ptr, bool)>> {
        let mut out = Vec::with_capacity((end - first) as usize);
        st.tree
            .for_each_entry(self.pool.meta(), first, end, &mut |_, e, w| {
                out.push((e, w));
                Ok(())
            })?;
        self.overlay_fresh(first, &mut out);
        Ok(out)
    }

    /// Allocates `n` data blocks for a write of blocks `first..first+count`
    /// (the caller holds the lock shared) and records them in flight. All
    /// or nothing.
    pub(super) fn allocate_fresh(
        &self,
        st: &DiskState,
        first: u64,
        count: u64,
        n: usize,
    ) -> Result<Vec<u64>> {
        let mut fresh = self.fresh.lock();
        // Room for the nodes the next commit may write: those already
        // dirty, the paths of this write, and one leaf per fresh entry at
        // most, but never more leaves than the disk has (plus their parents).
        let fan = FAN_OUT as u64;
        let leaves = (first + count - 1) / fan - first / fan + 1;
        let disk_leaves = (st.size / BLOCK_SIZE_U64).div_ceil(fan);
        let pending = ((fresh.map.len() + fresh.in_flight.len()) as u64).min(disk_leaves);
        let reserve = METADATA_RESERVE
            + st.tree.dirty_nodes() as u64
            + TREE_HEIGHT as u64 * leaves
            + pending
            + pending.div_ceil(fan) * TREE_HEIGHT as u64;
        let got = self.pool.allocate_many(n, reserve)?;
        fresh.in_flight.extend(got.iter().copied());
        Ok(got)
    }

    /// Ends writes of fresh blocks (the caller holds the lock shared):
    /// with `ok`, `links` (virtual block, new block) become visible;
    /// otherwise, or if the disk is gone, the blocks go back to the pool.
    pub(super) fn publish_fresh(
        &self,
        st: &DiskState,
        links: &[(u64, u64)],
        ok: bool,
    ) -> Result<()> {
        let usable = self.usable(st);
        let mut fresh = self.fresh.lock();
        if ok && usable.is_ok() {
            for &(v, addr) in links {
                fresh.in_flight.remove(&addr);
                if let Some(old) = fresh.map.insert(v, addr) {
                    fresh.replaced.push(old);
                }
            }
            return Ok(());
        }
        let unused: Vec<u64> = links
            .iter()
            .map(|&(_, addr)| addr)
            .filter(|addr| fresh.in_flight.remove(addr))
            .collect();
        drop(fresh);
        self.pool.free(&unused);
        usable
    }

    /// Gives back the new blocks of writes that failed or were abandoned
    /// (no lock needed: no tree or map has them yet).
    pub(super) fn abandon_fresh(&self, links: &[(u64, u64)]) {
        let unused: Vec<u64> = {
            let mut fresh = self.fresh.lock();
            links
                .iter()
                .map(|&(_, addr)| addr)
                .filter(|addr| fresh.in_flight.remove(addr))
                .collect()
        };
        self.pool.free(&unused);
    }

    fn read_data(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.pool
            .meta()
            .dev
            .read_at(buf, addr * BLOCK_SIZE_U64)
            .map_err(Error::io(format!("reading data block {addr}")))
    }

    fn write_data(&self, addr: u64, buf: &[u8]) -> Result<()> {
        self.pool
            .meta()
            .dev
            .write_at(buf, addr * BLOCK_SIZE_U64)
            .map_err(Error::io(format!("writing data block {addr}")))
    }

    /// Writes `data` at `within` of data block `addr`, owned by this disk.
    fn write_in_place(&self, v: u64, addr: u64, within: usize, data: &[u8]) -> Result<()> {
        // Whole-block writes take the stripe too, so that a concurrent
        // read-modify-write of the same block cannot write old bytes back.
        let _stripe = self.stripes[(v % STRIPES as u64) as usize].lock();
        if data.len() == BLOCK_SIZE {
            return self.write_data(addr, data);
        }
        let mut block = vec![0u8; BLOCK_SIZE];
        self.read_data(addr, &mut block)?;
        block[within..within + data.len()].copy_from_slice(data);
        self.write_data(addr, &block)
    }

    /// Writes a piece smaller than a block: a read-modify-write, under the
    /// disk's exclusive lock when it must allocate.
    pub(super) fn write_piece(&self, v: u64, within: usize, data: &[u8]) -> Result<()> {
        {
            let st = self.state.read();
            self.usable(&st)?;
            let (entry, writable) = self.entries(&st, v, v + 1)?[0];
            if writable {
                return self.write_in_place(v, entry.addr(), within, data);
            }
        }
        let mut st = self.lock_tree()?;
        self.usable(&st)?;
        let entry = st.tree.entry_for_write(self.pool.meta(), v)?;
        if entry.writable() {
            return self.write_in_place(v, entry.addr(), within, data);
        }
        let mut block = vec![0u8; BLOCK_SIZE];
        if data.len() < BLOCK_SIZE && !entry.is_null() {
            self.read_data(entry.addr(), &mut block)?;
        }
        block[within..within + data.len()].copy_from_slice(data);
        let reserve = METADATA_RESERVE + st.tree.dirty_nodes() as u64 + TREE_HEIGHT as u64;
        let addr = self.pool.allocate(reserve)?;
        if let Err(e) = self.write_data(addr, &block) {
            self.pool.free(&[addr]);
            return Err(e);
        }
        st.tree
            .set_entry(self.pool.meta(), v, Ptr::data(addr, true))
    }

    /// Writes whole blocks `first..first + data.len() / BLOCK_SIZE`, all
    /// under the shared lock except the data of new blocks:
    ///
    /// 1. Blocks the disk owns (in the tree or fresh) are overwritten in
    ///    place, one `write_at` per run of consecutive addresses.
    /// 2. The others get new blocks, recorded in flight (so `gc` keeps
    ///    them); the lock is dropped while their data is written, in runs.
    /// 3. Under the shared lock again, they are published as fresh entries
    ///    (see [`Fresh`]), visible to every later read and write.
    ///
    /// Concurrent writes to the same block end with one of them whole, as
    /// NBD allows; no reader ever sees a block that was not written.
    pub(super) fn write_blocks(&self, first: u64, data: &[u8]) -> Result<()> {
        let count = (data.len() / BLOCK_SIZE) as u64;
        let mut missing = Vec::new();
        let mut runs = Runs::default();
        let allocated = {
            let st = self.state.read();
            self.usable(&st)?;
            for (k, (entry, writable)) in self
                .entries(&st, first, first + count)?
                .into_iter()
                .enumerate()
            {
                if writable {
                    runs.push(k as u64, entry.addr());
                } else {
                    missing.push(k as u64);
                }
            }
            for run in std::mem::take(&mut runs).0 {
                self.write_data(run.addr, &data[run.bytes()])?;
            }
            if missing.is_empty() {
                return Ok(());
            }
            self.allocate_fresh(&st, first, count, missing.len())?
        };
        let links: Vec<(u64, u64)> = missing.iter().map(|&k| first + k).zip(allocated).collect();
        for &(v, addr) in &links {
            runs.push(v - first, addr);
        }
        let written = runs
            .0
            .iter()
            .try_for_each(|run| self.write_data(run.addr, &data[run.bytes()]));
        let st = self.state.read();
        self.publish_fresh(&st, &links, written.is_ok())?;
        written?;
        let fold = self.fresh.lock().map.len() > FRESH_FOLD_AT;
        drop(st);
        if fold {
            drop(self.lock_tree()?);
        }
        Ok(())
    }

    /// Unmaps whole block `v` (discard or zeroing).
    pub(super) fn unmap_block(&self, st: &mut DiskState, v: u64) -> Result<()> {
        let (entry, _) = st.tree.lookup(self.pool.meta(), v)?;
        if entry.is_null() {
            return Ok(());
        }
        let entry = st.tree.entry_for_write(self.pool.meta(), v)?;
        if entry.writable() {
            st.pending_free.push(entry.addr());
        }
        st.tree.set_entry(self.pool.meta(), v, Ptr::NULL)
    }
}

/// Reads through `tree`, and through the fresh writes of `disk` (whose
/// lock the caller holds shared) for a live disk.
pub(super) fn read_tree(
    pool: &Pool,
    tree: &Tree,
    disk: Option<&Disk>,
    scope: &CacheScope,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let first = offset / BLOCK_SIZE_U64;
    let end = (offset + buf.len() as u64).div_ceil(BLOCK_SIZE_U64);
    let mut found = Vec::with_capacity((end - first) as usize);
    tree.for_each_entry(pool.meta(), first, end, &mut |_, entry, w| {
        found.push((entry, w));
        Ok(())
    })?;
    if let Some(disk) = disk {
        disk.overlay_fresh(first, &mut found);
    }
    let read = |addr: u64, out: &mut [u8]| {
        pool.count_data_read(out.len() as u64);
        pool.meta()
            .dev
            .read_at(out, addr * BLOCK_SIZE_U64)
            .map_err(Error::io(format!("reading data block {addr}")))
    };
    let cache = pool.read_cache();
    // Whole mapped blocks are read in runs of consecutive addresses, each
    // with one `read_at` straight into the caller's buffer; cached copies
    // straight into it too.
    let mut runs = Runs::default();
    let mut partial = Vec::new();
    // Cacheable blocks the cache does not hold: fetched below.
    let mut missed = Vec::new();
    for ((_, within, r), (entry, writable)) in pieces(offset, buf.len()).zip(found) {
        if entry.is_null() {
            buf[r].fill(0);
            continue;
        }
        let addr = entry.addr();
        let range = match (cache, scope.for_block(writable)) {
            (Some(cache), u @ (Use::LookUp | Use::Fill(_))) => {
                // Counted once known: a miss is a block read from the pool.
                let whole = r.len() == BLOCK_SIZE;
                let hit = whole.then(|| cache.probe(addr, |a| scope.accepts(a)));
                if hit
                    .flatten()
                    .is_some_and(|h| cache.read(&h, &mut buf[r.clone()]))
                {
                    cache.count(true, 1);
                    continue;
                }
                match u {
                    Use::Fill(anchor) => {
                        missed.push((within, r, addr, anchor));
                        continue;
                    }
                    _ => {
                        cache.count(false, u64::from(whole));
                        r
                    }
                }
            }
            _ => r,
        };
        if range.len() == BLOCK_SIZE {
            runs.push_range(range, addr);
        } else {
            partial.push((within, range, addr));
        }
    }
    for run in runs.0 {
        read(run.addr, &mut buf[run.bytes()])?;
    }
    let mut block = parallax_device::AlignedBuf::zeroed(BLOCK_SIZE);
    for (within, r, addr) in partial {
        read(addr, &mut block)?;
        buf[r.clone()].copy_from_slice(&block[within..within + r.len()]);
    }
    if let Some(cache) = cache.filter(|_| !missed.is_empty()) {
        // One reader fetches a block from the pool, the others wait and
        // find it in memory (a boot storm reads each block once).
        let addrs: Vec<u64> = missed.iter().map(|m| m.2).collect();
        let _fetching = cache.lock_fetches(&addrs);
        let mut runs = Runs::default();
        let mut fetched = Vec::new();
        for (within, r, addr, anchor) in missed {
            let hit = cache.probe(addr, |a| scope.accepts(a));
            if r.len() == BLOCK_SIZE {
                let found = hit.is_some_and(|hit| cache.read(&hit, &mut buf[r.clone()]));
                cache.count(found, 1);
                if !found {
                    runs.push_range(r.clone(), addr);
                    fetched.push((addr, anchor, r));
                }
                continue;
            }
            let found = hit.is_some_and(|hit| cache.read(&hit, &mut block));
            cache.count(found, 1);
            if !found {
                read(addr, &mut block)?;
                cache.offer(addr, anchor, &block);
            }
            buf[r.clone()].copy_from_slice(&block[within..within + r.len()]);
        }
        for run in runs.0 {
            read(run.addr, &mut buf[run.bytes()])?;
        }
        for (addr, anchor, r) in fetched {
            cache.offer(addr, anchor, &buf[r]);
        }
    }
    Ok(())
}

/// One device transfer: consecutive blocks at consecutive addresses.
pub(super) struct Run {
    /// First device block.
    pub(super) addr: u64,
    /// Byte range in the caller's buffer.
    start: usize,
    end: usize,
}

impl Run {
    pub(super) fn bytes(&self) -> std::ops::Range<usize> {
        self.start..self.end
    }
}

/// Gathers whole-block transfers into [`Run`]s.
#[derive(Default)]
pub(super) struct Runs(pub(super) Vec<Run>);

impl Runs {
    pub(super) fn into_transfers(self) -> Vec<Transfer> {
        self.0
            .into_iter()
            .map(|r| Transfer {
                device_offset: r.addr * BLOCK_SIZE_U64,
                buf: r.start..r.end,
                cached: None,
            })
            .collect()
    }

    /// Adds whole block `k` of the caller's buffer, at device block `addr`.
    pub(super) fn push(&mut self, k: u64, addr: u64) {
        let start = k as usize * BLOCK_SIZE;
        self.push_range(start..start + BLOCK_SIZE, addr);
    }

    fn push_range(&mut self, r: std::ops::Range<usize>, addr: u64) {
        if let Some(last) = self.0.last_mut() {
            let blocks = ((last.end - last.start) / BLOCK_SIZE) as u64;
            if last.end == r.start && last.addr + blocks == addr {
                last.end = r.end;
                return;
            }
        }
        self.0.push(Run {
            addr,
            start: r.start,
            end: r.end,
        });
    }
}

pub(super) fn tree_extents(pool: &Pool, tree: &Tree, offset: u64, len: u64) -> Result<Vec<Extent>> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |start: u64, stop: u64, allocated: bool| {
        if stop <= start {
            return;
        }
        match out.last_mut() {
            Some(last) if last.allocated == allocated && last.offset + last.length == start => {
                last.length += stop - start
            }
            _ => out.push(Extent {
                offset: start,
                length: stop - start,
                allocated,
            }),
        }
    };
    let first = offset / BLOCK_SIZE_U64;
    let last = end.div_ceil(BLOCK_SIZE_U64);
    let mut cursor = offset;
    tree.for_each_mapped(pool.meta(), first, last, &mut |v, _| {
        let start = (v * BLOCK_SIZE_U64).max(offset);
        let stop = ((v + 1) * BLOCK_SIZE_U64).min(end);
        push(cursor, start, false);
        push(start, stop, true);
        cursor = stop;
        Ok(())
    })?;
    push(cursor, end, false);
    Ok(out)
}

pub(super) fn count_mapped(pool: &Pool, tree: &Tree) -> Result<u64> {
    Ok(tree.count_mapped(pool.meta())? * BLOCK_SIZE_U64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_block_edges() {
        let p: Vec<_> = pieces(4000, 5000).collect();
        assert_eq!(
            p,
            vec![(0, 4000, 0..96), (1, 0, 96..4192), (2, 0, 4192..5000)]
        );
        assert_eq!(pieces(8192, 0).count(), 0);
    }

    #[test]
    fn runs_merge_consecutive_blocks_only() {
        let mut runs = Runs::default();
        runs.push(0, 10);
        runs.push(1, 11);
        runs.push(2, 20);
        runs.push(4, 21);
        let t: Vec<_> = runs
            .into_transfers()
            .into_iter()
            .map(|t| (t.device_offset, t.buf, t.cached.is_some()))
            .collect();
        assert_eq!(
            t,
            vec![
                (10 * BLOCK_SIZE_U64, 0..2 * BLOCK_SIZE, false),
                (20 * BLOCK_SIZE_U64, 2 * BLOCK_SIZE..3 * BLOCK_SIZE, false),
                (21 * BLOCK_SIZE_U64, 4 * BLOCK_SIZE..5 * BLOCK_SIZE, false),
            ]
        );
    }

    #[test]
    fn ranges_past_the_end_are_refused() {
        assert!(check_io_range(8192, 4096, 4096).is_ok());
        assert!(check_io_range(8192, 4096, 4097).is_err());
        assert!(check_io_range(8192, u64::MAX, 2).is_err());
    }
}
