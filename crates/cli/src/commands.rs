//! One function per verb. Each opens the store with the access it needs,
//! does its work through `parallax-engine`, and prints its result as text
//! or, with `--json`, as JSON.

use crate::open::{open_store, Access, OpenStore};
use crate::output::{key_values, print, print_json, rfc3339, Table};
use crate::size::format_size;
use crate::transfer::{self, Source};
use crate::{DiskRef, SnapRef};
use anyhow::{bail, Result};
use parallax_engine::{Store, Vdi};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What every command gets from the global options.
pub struct Context {
    pub store_path: PathBuf,
    pub json: bool,
    pub host_id: u64,
}

impl Context {
    fn open(&self, access: Access) -> Result<OpenStore> {
        open_store(&self.store_path, access, self.host_id)
    }

    /// Runs a command that changes the store, then [`settle`]s it, also
    /// after a failure (earlier steps of `delete` may have succeeded).
    fn change<T>(&self, body: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        let s = self.open(Access::Write)?;
        let result = body(&s.store);
        settle(&s.store);
        result
    }
}

/// Makes the blocks freed by the last commit free on disk too (the
/// engine writes bitmaps lazily). Best effort: if it fails, the blocks stay
/// leaked, which `check` reports and `gc` repairs.
fn settle(store: &Store) {
    let _ = store.flush_all();
}

/// `size (bytes)` for `key: value` output.
fn size_with_bytes(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", format_size(bytes))
}

pub fn init(ctx: &Context, size: Option<u64>, force: bool) -> Result<()> {
    crate::open::init_store(&ctx.store_path, size, force, ctx.host_id)
}

pub fn create(ctx: &Context, name: &str, size: u64) -> Result<()> {
    ctx.change(|store| store.create_vdi(name, size).map(drop).map_err(Into::into))
}

#[derive(Serialize)]
struct DiskJson {
    name: String,
    size_bytes: u64,
    allocated_bytes: u64,
    snapshots: u64,
    origin: Option<String>,
    created: String,
}

fn disk_json(vdi: &Vdi) -> Result<DiskJson> {
    let info = vdi.info();
    Ok(DiskJson {
        name: info.name,
        size_bytes: info.size_bytes,
        allocated_bytes: vdi.allocated_bytes()?,
        snapshots: info.snapshot_count,
        origin: info.origin,
        created: rfc3339(info.created_ns),
    })
}

fn all_disks(store: &Store) -> Result<Vec<DiskJson>> {
    store
        .list()
        .iter()
        .map(|name| disk_json(&store.open_vdi(name)?))
        .collect()
}

pub fn list(ctx: &Context) -> Result<()> {
    let s = ctx.open(Access::Read)?;
    let disks = all_disks(&s.store)?;
    if ctx.json {
        return print_json(&disks);
    }
    let mut table = Table::new(&["NAME", "SIZE", "ALLOCATED", "SNAPSHOTS", "ORIGIN"]);
    for d in disks {
        table.row(vec![
            d.name,
            format_size(d.size_bytes),
            format_size(d.allocated_bytes),
            d.snapshots.to_string(),
            d.origin.unwrap_or_else(|| "-".into()),
        ]);
    }
    print(&table.render())
}

#[derive(Serialize)]
struct SnapshotJson {
    disk: String,
    name: String,
    id: u64,
    created: String,
    size_bytes: u64,
    allocated_bytes: u64,
}

pub fn info(ctx: &Context, target: &DiskRef) -> Result<()> {
    let s = ctx.open(Access::Read)?;
    if let Some(snap) = &target.snapshot {
        let view = s.store.open_snapshot(&target.disk, snap)?;
        let info = view.info();
        let j = SnapshotJson {
            disk: target.disk.clone(),
            name: info.name.clone(),
            id: info.id,
            created: rfc3339(info.created_ns),
            size_bytes: info.size_bytes,
            allocated_bytes: view.allocated_bytes()?,
        };
        if ctx.json {
            return print_json(&j);
        }
        return print(&key_values(&[
            ("disk", j.disk),
            ("name", j.name),
            ("id", j.id.to_string()),
            ("created", j.created),
            ("size", size_with_bytes(j.size_bytes)),
            ("allocated", size_with_bytes(j.allocated_bytes)),
        ]));
    }
    let vdi = s.store.open_vdi(&target.disk)?;
    let id = vdi.id();
    let d = disk_json(&vdi)?;
    if ctx.json {
        #[derive(Serialize)]
        struct InfoJson {
            id: u64,
            #[serde(flatten)]
            disk: DiskJson,
        }
        return print_json(&InfoJson { id, disk: d });
    }
    print(&key_values(&[
        ("name", d.name),
        ("id", id.to_string()),
        ("size", size_with_bytes(d.size_bytes)),
        ("allocated", size_with_bytes(d.allocated_bytes)),
        ("snapshots", d.snapshots.to_string()),
        ("origin", d.origin.unwrap_or_else(|| "-".into())),
        ("created", d.created),
    ]))
}

pub fn snapshot(ctx: &Context, target: &DiskRef) -> Result<()> {
    let info = ctx.change(|store| {
        Ok(store
            .open_vdi(&target.disk)?
            .snapshot(target.snapshot.as_deref())?)
    })?;
    if ctx.json {
        #[derive(Serialize)]
        struct Taken {
            disk: String,
            name: String,
            id: u64,
            created: String,
        }
        return print_json(&Taken {
            disk: target.disk.clone(),
            name: info.name,
            id: info.id,
            created: rfc3339(info.created_ns),
        });
    }
    print(&format!("{}@{}\n", target.disk, info.name))
}

pub fn snapshots(ctx: &Context, disk: &str) -> Result<()> {
    #[derive(Serialize)]
    struct Row {
        id: u64,
        name: String,
        created: String,
        size_bytes: u64,
    }
    let s = ctx.open(Access::Read)?;
    let rows: Vec<Row> = s
        .store
        .open_vdi(disk)?
        .snapshots()
        .into_iter()
        .map(|i| Row {
            id: i.id,
            name: i.name,
            created: rfc3339(i.created_ns),
            size_bytes: i.size_bytes,
        })
        .collect();
    if ctx.json {
        return print_json(&rows);
    }
    let mut table = Table::new(&["ID", "NAME", "CREATED", "SIZE"]);
    for r in rows {
        table.row(vec![
            r.id.to_string(),
            r.name,
            r.created,
            format_size(r.size_bytes),
        ]);
    }
    print(&table.render())
}

pub fn clone(ctx: &Context, source: &SnapRef, new: &str) -> Result<()> {
    ctx.change(|store| {
        store.clone_snapshot(&source.disk, &source.snapshot, new)?;
        Ok(())
    })
}

pub fn rollback(ctx: &Context, target: &SnapRef) -> Result<()> {
    ctx.change(|store| Ok(store.open_vdi(&target.disk)?.rollback(&target.snapshot)?))
}

pub fn delete(ctx: &Context, targets: &[DiskRef]) -> Result<()> {
    ctx.change(|store| {
        for target in targets {
            let done = match &target.snapshot {
                Some(snap) => store
                    .open_vdi(&target.disk)
                    .and_then(|v| v.delete_snapshot(snap)),
                None => store.delete_vdi(&target.disk),
            };
            if let Err(e) = done {
                bail!("cannot delete {target}: {e}");
            }
        }
        Ok(())
    })
}

pub fn import(ctx: &Context, file: &Path, name: &str, size: Option<u64>) -> Result<()> {
    ctx.change(|store| transfer::import(store, file, name, size))
}

pub fn export(ctx: &Context, source: &DiskRef, file: &Path, force: bool) -> Result<()> {
    let s = ctx.open(Access::Read)?;
    let source = match &source.snapshot {
        Some(snap) => Source::Snapshot(s.store.open_snapshot(&source.disk, snap)?),
        None => Source::Disk(s.store.open_vdi(&source.disk)?),
    };
    transfer::export(&source, file, force, &ctx.store_path)
}

pub fn check(ctx: &Context) -> Result<()> {
    let s = ctx.open(Access::Read)?;
    let r = s.store.check()?;
    if ctx.json {
        #[derive(Serialize)]
        struct CheckJson<'a> {
            clean: bool,
            disks: u64,
            snapshots: u64,
            tree_nodes: u64,
            data_blocks: u64,
            metadata_blocks: u64,
            leaked_blocks: u64,
            errors: &'a [String],
            warnings: &'a [String],
        }
        print_json(&CheckJson {
            clean: r.is_clean(),
            disks: r.disks,
            snapshots: r.snapshots,
            tree_nodes: r.tree_nodes,
            data_blocks: r.data_blocks,
            metadata_blocks: r.metadata_blocks,
            leaked_blocks: r.leaked_blocks,
            errors: &r.errors,
            warnings: &r.warnings,
        })?;
    } else {
        let mut text = key_values(&[
            ("disks", r.disks.to_string()),
            ("snapshots", r.snapshots.to_string()),
            ("tree nodes", r.tree_nodes.to_string()),
            ("data blocks", r.data_blocks.to_string()),
            ("metadata blocks", r.metadata_blocks.to_string()),
            ("leaked blocks", r.leaked_blocks.to_string()),
            ("errors", r.errors.len().to_string()),
            ("warnings", r.warnings.len().to_string()),
        ]);
        for e in &r.errors {
            text.push_str(&format!("error: {e}\n"));
        }
        for w in &r.warnings {
            text.push_str(&format!("warning: {w}\n"));
        }
        print(&text)?;
    }
    match r.errors.len() {
        0 => Ok(()),
        1 => bail!("the store has 1 error"),
        n => bail!("the store has {n} errors"),
    }
}

pub fn gc(ctx: &Context) -> Result<()> {
    let s = ctx.open(Access::Write)?;
    let r = s.store.gc()?;
    if ctx.json {
        #[derive(Serialize)]
        struct GcJson {
            freed_blocks: u64,
            freed_bytes: u64,
        }
        return print_json(&GcJson {
            freed_blocks: r.freed_blocks,
            freed_bytes: r.freed_bytes,
        });
    }
    print(&format!(
        "freed {} ({} blocks)\n",
        format_size(r.freed_bytes),
        r.freed_blocks
    ))
}

pub fn df(ctx: &Context) -> Result<()> {
    #[derive(Serialize)]
    struct DiskUse {
        name: String,
        size_bytes: u64,
        allocated_bytes: u64,
    }
    #[derive(Serialize)]
    struct DfJson {
        capacity_bytes: u64,
        used_bytes: u64,
        free_bytes: u64,
        disks: Vec<DiskUse>,
    }
    let s = ctx.open(Access::Read)?;
    let stats = s.store.stats();
    let disks: Vec<DiskUse> = all_disks(&s.store)?
        .into_iter()
        .map(|d| DiskUse {
            name: d.name,
            size_bytes: d.size_bytes,
            allocated_bytes: d.allocated_bytes,
        })
        .collect();
    if ctx.json {
        return print_json(&DfJson {
            capacity_bytes: stats.capacity_bytes,
            used_bytes: stats.used_bytes,
            free_bytes: stats.free_bytes,
            disks,
        });
    }
    let percent = stats.used_bytes as f64 * 100.0 / stats.capacity_bytes.max(1) as f64;
    let mut text = key_values(&[
        ("capacity", format_size(stats.capacity_bytes)),
        (
            "used",
            format!("{} ({percent:.1}%)", format_size(stats.used_bytes)),
        ),
        ("free", format_size(stats.free_bytes)),
    ]);
    if !disks.is_empty() {
        let mut table = Table::new(&["NAME", "SIZE", "ALLOCATED"]);
        for d in disks {
            table.row(vec![
                d.name,
                format_size(d.size_bytes),
                format_size(d.allocated_bytes),
            ]);
        }
        text.push('\n');
        text.push_str(&table.render());
    }
    print(&text)
}
