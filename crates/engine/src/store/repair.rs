//! Repair (`parallax repair`): makes a damaged store's bitmaps agree with
//! its metadata again, with the operator deciding what cannot be decided
//! for them. Modelled on `thin_check` / `thin_repair`.
//!
//! Repair runs on a store no disk is open on (the CLI opens it alone, the
//! daemon stopped). It first *plans*: for every disk, both header copies
//! are read, and each valid one is walked whole (snapshot log, every
//! snapshot's tree, the live tree), noting the blocks it reaches, which of
//! them the bitmaps call free, and which cannot be read. The newest valid
//! copy is the default choice. The operator must decide (serve the disk at
//! a generation they name, or forget the disk) when the default would
//! serve data that may be stale or wrong:
//! - no copy can be served (none valid, or its root or log unreadable);
//! - the chosen copy reaches blocks that cannot be read (reads or
//!   snapshots there would fail);
//! - the chosen copy reaches blocks marked free while the other copy is not
//!   valid: the newest header was probably lost, and the disk would be
//!   served as it was one or more commits earlier;
//! - a block the chosen live tree owns is reached by another disk too (a
//!   block freed after the lost generation and reused since): the blame
//!   goes to the side whose copy is suspect (any of the above, or an older
//!   generation picked by hand), or to both when neither or both are.
//!
//! Invariants of what [`Store::repair`] writes:
//! - It never frees a block. It marks allocated every block that any valid
//!   header copy of any disk (either generation) or the registry reaches,
//!   and leaves every other bit as it was: the leaks are for `gc`, which
//!   checks the store first.
//! - The bitmaps are written and flushed before any header it rewrites
//!   (the order of a commit).
//! - Nothing is written while a decision is missing.

use crate::error::{Error, Result};
use crate::store::catalog::{read_header_copies, remove_entry};
use crate::store::check::Marking;
use crate::store::Store;
use parallax_format::{RegistryEntry, VdiHeader, TREE_HEIGHT};
use std::collections::{BTreeMap, HashMap, HashSet};

/// What the operator decided, and whether to write.
#[derive(Debug, Clone, Default)]
pub struct RepairOptions {
    /// Disk name ─▶ the header generation to serve it at.
    pub use_generation: BTreeMap<String, u64>,
    /// Disks to remove from the registry (their blocks become leaks).
    pub forget: HashSet<String>,
    /// Write the repair; without it, only plan.
    pub apply: bool,
}

/// One header copy of a disk, as the plan found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderCopy {
    /// 0 = A, 1 = B.
    pub slot: usize,
    /// The copy's generation, or why it is not valid.
    pub generation: std::result::Result<u64, String>,
    /// Blocks it reaches (log, snapshot trees, live tree, data).
    pub blocks: u64,
    /// Of them, blocks the bitmaps mark free.
    pub marked_free: u64,
    /// What could not be read (the first few).
    pub unreadable: Vec<String>,
    /// Its root and snapshot log are readable: the disk can be opened at
    /// this generation.
    pub servable: bool,
}

/// The plan for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRepair {
    pub name: String,
    pub copies: Vec<HeaderCopy>,
    /// The generation it will be served at (`None`: forgotten, or no copy
    /// can be served).
    pub chosen: Option<u64>,
    pub forget: bool,
    /// Why the operator must decide, if they must and have not.
    pub decision: Option<String>,
}

/// What [`Store::repair`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Every disk with something to say (all but the healthy ones).
    pub disks: Vec<DiskRepair>,
    /// Healthy disks (their newest copy valid, intact, marked allocated).
    pub healthy: u64,
    /// Extents without a valid bitmap copy (rebuilt from the mark).
    pub lost_bitmaps: Vec<u64>,
    /// Referenced blocks the bitmaps mark free (marked allocated).
    pub blocks_to_claim: u64,
    /// Header copies rewritten so that a chosen older generation wins.
    pub headers_to_rewrite: u64,
    /// The repair was written.
    pub applied: bool,
}

impl RepairReport {
    /// Disks waiting for the operator's decision.
    pub fn undecided(&self) -> Vec<&DiskRepair> {
        self.disks.iter().filter(|d| d.decision.is_some()).collect()
    }

    /// Whether there is anything to repair.
    pub fn needed(&self) -> bool {
        !self.disks.is_empty() || !self.lost_bitmaps.is_empty() || self.blocks_to_claim > 0
    }
}

/// How many unreadable blocks a copy lists before it stops.
const LISTED: usize = 5;

/// One valid copy walked whole.
struct Walked {
    slot: usize,
    header: VdiHeader,
    roles: HashSet<u64>,
    owned: HashSet<u64>,
}

fn walk_copy(
    store: &Store,
    entry: &RegistryEntry,
    slot: usize,
    copy: std::result::Result<VdiHeader, String>,
) -> (HeaderCopy, Option<Walked>) {
    let header = match copy {
        Ok(h) => h,
        Err(e) => {
            let report = HeaderCopy {
                slot,
                generation: Err(e),
                blocks: 0,
                marked_free: 0,
                unreadable: Vec::new(),
                servable: false,
            };
            return (report, None);
        }
    };
    let pool = store.pool();
    let mut m = Marking::default();
    let owned = m.mark_disk(store, &entry.name, &header);
    let servable = root_and_log_readable(store, &header);
    let marked_free = m.roles.keys().filter(|&&a| !pool.is_allocated(a)).count() as u64;
    let mut unreadable: Vec<String> = m.errors.iter().take(LISTED).cloned().collect();
    if m.errors.len() > LISTED {
        unreadable.push(format!("and {} more", m.errors.len() - LISTED));
    }
    let report = HeaderCopy {
        slot,
        generation: Ok(header.generation),
        blocks: m.roles.len() as u64,
        marked_free,
        unreadable,
        servable,
    };
    let walked = Walked {
        slot,
        header,
        roles: m.roles.into_keys().collect(),
        owned,
    };
    (report, Some(walked))
}

/// Whether a disk can be opened at this header: its root and its snapshot
/// log read back.
fn root_and_log_readable(store: &Store, header: &VdiHeader) -> bool {
    let meta = store.pool().meta();
    let root =
        header.root.is_null() || meta.load_node(header.root, (TREE_HEIGHT - 1) as u8).is_ok();
    root && crate::disk::log::read_chain(store.pool(), header.log_head, header.vdi_id).is_ok()
        && crate::disk::journal::read_journal(store.pool(), header.journal_head, header.vdi_id)
            .is_ok()
}

/// A disk's plan while it is being made.
struct Planned {
    entry: RegistryEntry,
    report: DiskRepair,
    walked: Vec<Walked>,
    /// Index in `walked` of the chosen copy.
    chosen: Option<usize>,
    /// The chosen copy is not plainly the newest intact one.
    suspect: bool,
    /// Its newest copy is valid and intact, and nothing was asked of it.
    healthy: bool,
}

impl Store {
    /// Plans a repair and, with `options.apply` and every decision made,
    /// writes it: see the module documentation. Refused while disks are
    /// open.
    pub fn repair(&self, options: &RepairOptions) -> Result<RepairReport> {
        if self.is_shared() {
            return Err(Error::InvalidArgument(
                "repair of a store several appliances share is not built yet: stop the others and open it alone".into(),
            ));
        }
        let mut catalog = self.inner.catalog.lock();
        if !self.inner.open.lock().is_empty() {
            return Err(Error::Busy(
                "repair runs on a store no disk is open on".into(),
            ));
        }
        let pool = self.pool().clone();
        let entries = catalog.entries();
        for name in options.use_generation.keys().chain(&options.forget) {
            if !entries.iter().any(|e| &e.name == name) {
                return Err(Error::NotFound(format!("disk {name} does not exist")));
            }
        }
        let mut report = RepairReport {
            lost_bitmaps: pool.lost_bitmaps(),
            ..RepairReport::default()
        };
        let mut planned = Vec::with_capacity(entries.len());
        for entry in entries {
            let mut copies = Vec::new();
            let mut walked = Vec::new();
            for (slot, copy) in read_header_copies(&pool, &entry)?.into_iter().enumerate() {
                let (c, w) = walk_copy(self, &entry, slot, copy);
                copies.push(c);
                walked.extend(w);
            }
            planned.push(self.choose(entry, copies, walked, options)?);
        }
        blame_shared_blocks(&mut planned);
        // What the registry and the chosen copies reach (headers included):
        // marked allocated.
        let mut reached: HashSet<u64> = catalog
            .sb()
            .registry
            .iter()
            .filter(|p| !p.is_null())
            .map(|p| p.addr())
            .collect();
        let mut rewrites = Vec::new();
        for p in planned {
            if let Some(w) = p.chosen.map(|i| &p.walked[i]) {
                reached.extend(&w.roles);
                reached.extend([p.entry.header_a, p.entry.header_b]);
                // The chosen copy must win the next open (`newer_header`):
                // the highest epoch and a generation above every copy's.
                let key = |w: &Walked| (w.header.writer_epoch, w.header.generation);
                let newest = p.walked.iter().map(key).max();
                if Some(key(w)) != newest {
                    let addr = [p.entry.header_a, p.entry.header_b][w.slot];
                    let mut header = w.header.clone();
                    let top = p.walked.iter().map(|w| w.header.generation).max();
                    header.generation = top.unwrap_or(header.generation) + 1;
                    header.writer_epoch = newest.map_or(header.writer_epoch, |n| n.0);
                    rewrites.push((p.entry.name.clone(), addr, header));
                }
            }
            if p.healthy && p.report.decision.is_none() {
                report.healthy += 1;
            } else {
                report.disks.push(p.report);
            }
        }
        report.blocks_to_claim = reached.iter().filter(|&&a| !pool.is_allocated(a)).count() as u64;
        report.headers_to_rewrite = rewrites.len() as u64;
        if !options.apply || !report.undecided().is_empty() || !report.needed() {
            return Ok(report);
        }
        // Bitmaps first: after this, nothing a chosen copy reaches can be
        // handed out again, whatever follows.
        pool.claim(reached);
        pool.sync_bitmaps()?;
        // A chosen older copy is rewritten in place with a generation above
        // the other copy's: it wins from now on, and the disk's next commit
        // overwrites the other copy.
        for (name, addr, header) in rewrites {
            let (block, _) = header.encode(pool.meta().store_id, addr);
            pool.meta().write_block(addr, &block, "a VDI header")?;
            if let Some(d) = report.disks.iter_mut().find(|d| d.name == name) {
                d.chosen = Some(header.generation);
            }
        }
        pool.meta().flush()?;
        pool.clear_damaged();
        for d in report.disks.iter().filter(|d| d.forget) {
            let (slot, entry) = catalog
                .find(&d.name)
                .ok_or_else(|| Error::NotFound(format!("disk {} does not exist", d.name)))?;
            if let Some(old) = remove_entry(&pool, &mut catalog, slot, entry.vdi_id)? {
                pool.free(&[old]);
            }
        }
        pool.sync_bitmaps()?;
        report.applied = true;
        Ok(report)
    }

    /// Chooses the copy to serve `entry` at, and says whether the operator
    /// must decide.
    fn choose(
        &self,
        entry: RegistryEntry,
        copies: Vec<HeaderCopy>,
        walked: Vec<Walked>,
        options: &RepairOptions,
    ) -> Result<Planned> {
        let name = entry.name.clone();
        let forget = options.forget.contains(&name);
        let wanted = options.use_generation.get(&name).copied();
        let copy_of = |w: &Walked| {
            copies
                .iter()
                .find(|c| c.generation.as_ref().ok() == Some(&w.header.generation))
                .expect("every walked copy has a report")
        };
        let newest = (0..walked.len())
            .max_by_key(|&i| (walked[i].header.writer_epoch, walked[i].header.generation));
        let chosen = match wanted {
            _ if forget => None,
            Some(g) => {
                let i = walked
                    .iter()
                    .position(|w| w.header.generation == g)
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "disk {name} has no valid header copy of generation {g}"
                        ))
                    })?;
                if !copy_of(&walked[i]).servable {
                    return Err(Error::InvalidArgument(format!(
                        "disk {name} cannot be served at generation {g}: its root or snapshot log cannot be read"
                    )));
                }
                Some(i)
            }
            None => newest,
        };
        let mut decision = None;
        let mut suspect = wanted.is_some() && chosen != newest;
        match chosen {
            None if !forget => {
                decision = Some("no header copy is valid".to_string());
                suspect = true;
            }
            None => {}
            Some(i) => {
                let c = copy_of(&walked[i]);
                let other_valid = walked.len() == 2;
                if !c.servable {
                    decision = Some(format!(
                        "generation {} cannot be served: its root or snapshot log cannot be read",
                        walked[i].header.generation
                    ));
                } else if !c.unreadable.is_empty() {
                    decision = Some(format!(
                        "generation {} reaches blocks that cannot be read (reads there will fail): {}",
                        walked[i].header.generation,
                        c.unreadable.join("; ")
                    ));
                } else if c.marked_free > 0 && !other_valid {
                    decision = Some(format!(
                        "the other header copy is not valid and generation {} reaches {} blocks the bitmaps call free: the newest generation was probably lost, and the disk would be served as it was at an earlier commit",
                        walked[i].header.generation, c.marked_free
                    ));
                }
                suspect |= decision.is_some();
            }
        }
        let by_hand = wanted.is_some() || forget;
        if by_hand && chosen.is_some_and(|i| copy_of(&walked[i]).servable) || forget {
            decision = None;
        }
        let healthy = !by_hand
            && chosen.is_some_and(|i| {
                let c = copy_of(&walked[i]);
                c.servable && c.unreadable.is_empty() && c.marked_free == 0
            });
        let report = DiskRepair {
            name,
            chosen: chosen.map(|i| walked[i].header.generation),
            copies: copies.clone(),
            forget,
            decision,
        };
        Ok(Planned {
            entry,
            report,
            walked,
            chosen,
            suspect,
            healthy,
        })
    }
}

/// A block the chosen live tree of one disk owns must be reached by no
/// other disk's chosen copy: see the module documentation for who must
/// decide.
fn blame_shared_blocks(planned: &mut [Planned]) {
    let mut owner: HashMap<u64, usize> = HashMap::new();
    for (i, p) in planned.iter().enumerate() {
        if let Some(c) = p.chosen {
            for &a in &p.walked[c].owned {
                owner.insert(a, i);
            }
        }
    }
    let mut shared: BTreeMap<(usize, usize), u64> = BTreeMap::new();
    for (i, p) in planned.iter().enumerate() {
        if let Some(c) = p.chosen {
            for a in &p.walked[c].roles {
                if let Some(&o) = owner.get(a).filter(|&&o| o != i) {
                    *shared.entry((o, i)).or_default() += 1;
                }
            }
        }
    }
    for ((o, i), n) in shared {
        let (so, si) = (planned[o].suspect, planned[i].suspect);
        let blame: &[usize] = match (so, si) {
            (true, false) => &[o],
            (false, true) => &[i],
            _ => &[o, i],
        };
        let names = [
            planned[o].report.name.clone(),
            planned[i].report.name.clone(),
        ];
        for &b in blame {
            let p = &mut planned[b];
            if p.report.forget {
                continue;
            }
            p.report.decision.get_or_insert(format!(
                "{n} blocks that disk {} owns are reached by disk {} too: one of them would read the other's data",
                names[0], names[1]
            ));
        }
    }
}
