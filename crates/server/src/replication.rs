//! `parallax diff`, `send` and `receive`: what changed between two
//! snapshots, and a snapshot carried to another store whole or as its
//! difference from an older one (`docs/SEND.md`).
//!
//! Receive's promise: the target is left as it was unless the whole
//! stream arrived and checked out. A full stream makes a new disk, deleted
//! again if anything fails; an incremental one is applied to a disk whose
//! live state is exactly the stream's base snapshot (checked with a diff,
//! so nobody wrote to it since), and rolled back to that snapshot if
//! anything fails; or, when the disk does not exist, to a new clone of the
//! snapshot of another disk that is the base (a clone sent from its
//! origin's snapshot), deleted again if anything fails. Either way it takes effect as one snapshot taken at the
//! end, carrying the sender's identity for the next incremental stream.
//! The disk should not be attached to clients while it receives (a
//! replica): their writes would be refused next time, or rolled back.

use crate::api::{ApiError, ApiResult, ErrorKind};
use parallax_engine::{diff, Change, ChangeKind, DiffTarget, ReadDisk, SnapshotView, Store, Vdi};
use parallax_format::stream::{
    StreamError, StreamHeader, StreamReader, StreamRecord, StreamWriter, MAX_DATA_RECORD,
};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// Bytes read from the disk per DATA record.
const CHUNK: u64 = MAX_DATA_RECORD as u64 / 4;

/// A snapshot named as `DISK@SNAP`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapName {
    pub disk: String,
    pub snapshot: String,
}

/// What `parallax diff` reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiffReport {
    /// The newer side's virtual size.
    pub size: u64,
    pub changed_bytes: u64,
    pub extents: Vec<ChangedExtent>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChangedExtent {
    pub offset: u64,
    pub length: u64,
    /// `data`, or `zero` (reads as zeros: discarded or zeroed).
    pub kind: String,
}

/// What `parallax send` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SendReport {
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub identity: String,
    pub from_identity: Option<String>,
}

/// What `parallax receive` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReceiveReport {
    pub disk: String,
    pub snapshot: String,
    pub incremental: bool,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub identity: String,
}

/// An identity as shown to users: 16 hex digits.
pub fn show_identity(id: u64) -> String {
    format!("{id:016x}")
}

/// The changes from snapshot `from` to `to` (`to.snapshot` `None`: the
/// live disk).
pub fn diff_report(
    store: &Store,
    from: &SnapName,
    to: &str,
    to_snap: Option<&str>,
) -> ApiResult<DiffReport> {
    let from = store.open_snapshot(&from.disk, &from.snapshot)?;
    let (changes, size) = match to_snap {
        Some(s) => {
            let view = store.open_snapshot(to, s)?;
            (diff(Some(&from), DiffTarget::Snapshot(&view))?, view.size())
        }
        None => {
            let vdi = store.open_vdi(to)?;
            (diff(Some(&from), DiffTarget::Live(&vdi))?, vdi.size())
        }
    };
    Ok(DiffReport {
        size,
        changed_bytes: changes.iter().map(|c| c.length).sum(),
        extents: changes
            .iter()
            .map(|c| ChangedExtent {
                offset: c.offset,
                length: c.length,
                kind: kind_name(c.kind).into(),
            })
            .collect(),
    })
}

fn kind_name(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Data => "data",
        ChangeKind::Zero => "zero",
    }
}

/// A send worked out (the snapshots open, their difference known), ready
/// to write: the daemon answers with its report before it streams.
pub struct SendPlan {
    view: SnapshotView,
    changes: Vec<Change>,
    header: StreamHeader,
    report: SendReport,
}

/// Plans sending snapshot `to`: whole, or with `from` its difference from
/// that older snapshot (of the same disk, or of the disk's clone origin).
pub fn plan_send(store: &Store, to: &SnapName, from: Option<&SnapName>) -> ApiResult<SendPlan> {
    let view = store.open_snapshot(&to.disk, &to.snapshot)?;
    let base = from
        .map(|f| store.open_snapshot(&f.disk, &f.snapshot))
        .transpose()?;
    let changes = diff(base.as_ref(), DiffTarget::Snapshot(&view))?;
    let data_bytes = bytes_of(&changes, ChangeKind::Data);
    let header = StreamHeader {
        store_id: store.store_id(),
        disk_id: view.vdi_id(),
        from_identity: base.as_ref().map_or(0, |b| b.identity()),
        to_identity: view.identity(),
        to_created_ns: view.info().created_ns,
        data_bytes,
        disk_name: to.disk.clone(),
        // `DISK@SNAP` when the base is a snapshot of another disk (a
        // clone's origin), else `SNAP`.
        from_name: from
            .map(|f| match f.disk == to.disk {
                true => f.snapshot.clone(),
                false => format!("{}@{}", f.disk, f.snapshot),
            })
            .unwrap_or_default(),
        to_name: to.snapshot.clone(),
    };
    let report = SendReport {
        data_bytes,
        zero_bytes: bytes_of(&changes, ChangeKind::Zero),
        identity: show_identity(header.to_identity),
        from_identity: base.map(|b| show_identity(b.identity())),
    };
    Ok(SendPlan {
        view,
        changes,
        header,
        report,
    })
}

impl SendPlan {
    pub fn report(&self) -> &SendReport {
        &self.report
    }

    /// Writes the stream to `out` (the caller shows progress, if it
    /// wants, by counting what goes through `out`).
    pub fn write(&self, out: &mut dyn Write) -> ApiResult<()> {
        self.write_records(out)
            .map_err(|e| ApiError::internal(format!("cannot write the stream: {e:#}")))
    }

    fn write_records(&self, out: &mut dyn Write) -> anyhow::Result<()> {
        // A record is three writes: gather them (a pipe or a file would
        // take a system call each).
        let out = std::io::BufWriter::with_capacity(IO_BUFFER, out);
        let mut w = StreamWriter::new(out, &self.header)?;
        w.size(self.view.size())?;
        let mut buf = vec![0u8; CHUNK as usize];
        for c in &self.changes {
            match c.kind {
                ChangeKind::Zero => w.zero(c.offset, c.length)?,
                ChangeKind::Data => {
                    let end = c.offset + c.length;
                    let mut at = c.offset;
                    while at < end {
                        let n = CHUNK.min(end - at) as usize;
                        self.view.read(&mut buf[..n], at)?;
                        w.data(at, &buf[..n])?;
                        at += n as u64;
                    }
                }
            }
        }
        w.finish()?;
        Ok(())
    }
}

/// Bytes gathered before a stream goes to its writer, or read ahead from
/// its reader.
const IO_BUFFER: usize = 1 << 20;

fn bytes_of(changes: &[Change], kind: ChangeKind) -> u64 {
    changes
        .iter()
        .filter(|c| c.kind == kind)
        .map(|c| c.length)
        .sum()
}

/// Applies the stream read from `input` to disk `name` (see the module
/// documentation). `force`: an incremental stream's target that changed
/// since the base snapshot is rolled back to it first. (The caller shows
/// progress, if it wants, by counting what it reads into `input`.)
pub fn receive(
    store: &Store,
    name: &str,
    input: &mut dyn Read,
    force: bool,
) -> ApiResult<ReceiveReport> {
    // A record is three reads: read ahead instead of a system call each.
    let mut input = std::io::BufReader::with_capacity(IO_BUFFER, input);
    let input: &mut dyn Read = &mut input;
    let (mut reader, header) = StreamReader::new(input).map_err(stream_error)?;
    let mut applied = Applied::default();
    if header.from_identity == 0 {
        receive_full(store, name, &mut reader, &header, &mut applied)?;
    } else {
        receive_incremental(store, name, &mut reader, &header, force, &mut applied)?;
    }
    Ok(ReceiveReport {
        disk: name.to_string(),
        snapshot: header.to_name.clone(),
        incremental: header.from_identity != 0,
        data_bytes: applied.data,
        zero_bytes: applied.zero,
        identity: show_identity(header.to_identity),
    })
}

type Reader<'a> = StreamReader<&'a mut dyn Read>;

/// A full stream: a new disk, deleted again if anything fails.
fn receive_full(
    store: &Store,
    name: &str,
    reader: &mut Reader<'_>,
    header: &StreamHeader,
    applied: &mut Applied,
) -> ApiResult<()> {
    if store.open_vdi(name).is_ok() {
        return Err(ApiError::new(
            ErrorKind::Conflict,
            format!(
                "disk {name} exists; a full stream makes a new disk (receive it under another name, or send incrementally with --from)"
            ),
        ));
    }
    let size = first_size(reader)?;
    let vdi = store.create_vdi(name, size)?;
    let result = apply(reader, &vdi, applied).and_then(|()| finish(&vdi, header));
    if result.is_err() {
        drop(vdi);
        let _ = store.delete_vdi(name);
    }
    result
}

/// An incremental stream: onto disk `name`, or, when there is no such
/// disk, onto a new clone of the snapshot of another disk that is its base
/// (a clone's snapshot sent from its origin's snapshot).
fn receive_incremental(
    store: &Store,
    name: &str,
    reader: &mut Reader<'_>,
    header: &StreamHeader,
    force: bool,
    applied: &mut Applied,
) -> ApiResult<()> {
    match store.open_vdi(name) {
        Ok(vdi) => receive_onto(store, &vdi, reader, header, force, applied),
        Err(parallax_engine::Error::NotFound(_)) => {
            receive_as_clone(store, name, reader, header, applied)
        }
        Err(e) => Err(e.into()),
    }
}

/// Onto a disk that is exactly its base snapshot, rolled back to it if
/// anything fails.
fn receive_onto(
    store: &Store,
    vdi: &Vdi,
    reader: &mut Reader<'_>,
    header: &StreamHeader,
    force: bool,
    applied: &mut Applied,
) -> ApiResult<()> {
    let base = find_base(vdi, header)?;
    if vdi.snapshot_info(&header.to_name).is_ok() {
        return Err(ApiError::new(
            ErrorKind::Conflict,
            format!("{}@{} already exists", vdi.name(), header.to_name),
        ));
    }
    prepare_base(store, vdi, &base, force)?;
    let result = apply_sized(reader, vdi, applied).and_then(|()| finish(vdi, header));
    if result.is_err() {
        // Back to the base: the stream never happened.
        let _ = vdi.rollback(&base);
    }
    result
}

/// Onto a new disk `name`, a clone of the snapshot of another disk whose
/// identity is the stream's base; deleted again if anything fails.
fn receive_as_clone(
    store: &Store,
    name: &str,
    reader: &mut Reader<'_>,
    header: &StreamHeader,
    applied: &mut Applied,
) -> ApiResult<()> {
    let (disk, snapshot) = find_base_anywhere(store, header)?;
    let vdi = store.clone_snapshot(&disk, &snapshot, name)?;
    let result = apply_sized(reader, &vdi, applied).and_then(|()| finish(&vdi, header));
    if result.is_err() {
        drop(vdi);
        let _ = store.delete_vdi(name);
    }
    result
}

/// The SIZE record (the disk grown to it), then the rest of the stream.
fn apply_sized(reader: &mut Reader<'_>, vdi: &Vdi, applied: &mut Applied) -> ApiResult<()> {
    let size = first_size(reader)?;
    if size < vdi.size() {
        return Err(ApiError::invalid(format!(
            "the stream's disk is {size} bytes, smaller than {} ({} bytes): disks do not shrink",
            vdi.name(),
            vdi.size()
        )));
    }
    if size > vdi.size() {
        vdi.grow(size)?;
    }
    apply(reader, vdi, applied)
}

/// The SIZE record, which comes before any data.
fn first_size(reader: &mut Reader<'_>) -> ApiResult<u64> {
    match reader.next_record().map_err(stream_error)? {
        StreamRecord::Size(size) => Ok(size),
        _ => Err(stream_error(StreamError::Corrupt(
            "the SIZE record is not first".into(),
        ))),
    }
}

/// The stream checked out: durable, then one snapshot with the sender's
/// identity.
fn finish(vdi: &Vdi, header: &StreamHeader) -> ApiResult<()> {
    vdi.flush()?;
    vdi.snapshot_received(&header.to_name, header.to_identity)?;
    Ok(())
}

/// The name of `vdi`'s snapshot whose identity is the stream's base.
fn find_base(vdi: &Vdi, header: &StreamHeader) -> ApiResult<String> {
    vdi.snapshots()
        .into_iter()
        .find(|s| vdi.snapshot_identity(s) == header.from_identity)
        .map(|s| s.name)
        .ok_or_else(|| {
            ApiError::new(
                ErrorKind::NotFound,
                format!(
                    "the stream is the difference from {} (identity {}), which {} does not hold: send from a snapshot it has, or a full stream",
                    base_name(header),
                    show_identity(header.from_identity),
                    vdi.name()
                ),
            )
        })
}

/// The stream's base as the sender named it: `DISK@SNAP`.
fn base_name(header: &StreamHeader) -> String {
    match header.from_name.contains('@') {
        true => header.from_name.clone(),
        false => format!("{}@{}", header.disk_name, header.from_name),
    }
}

/// The disk and snapshot of this store whose identity is the stream's
/// base, searched in every disk.
fn find_base_anywhere(store: &Store, header: &StreamHeader) -> ApiResult<(String, String)> {
    for disk in store.try_list()? {
        // A disk this host cannot open (another appliance holds it) is
        // not a base here.
        let Ok(vdi) = store.open_vdi(&disk) else {
            continue;
        };
        if let Ok(snapshot) = find_base(&vdi, header) {
            return Ok((disk, snapshot));
        }
    }
    Err(ApiError::new(
        ErrorKind::NotFound,
        format!(
            "no disk here holds {} (identity {}), the stream's base: receive it first, or send a full stream",
            base_name(header),
            show_identity(header.from_identity)
        ),
    ))
}

/// Checks that `vdi` is still exactly snapshot `base` (or, with `force`,
/// rolls it back to it).
fn prepare_base(store: &Store, vdi: &Vdi, base: &str, force: bool) -> ApiResult<()> {
    let view = store.open_snapshot(&vdi.name(), base)?;
    let changed = diff(Some(&view), DiffTarget::Live(vdi))?;
    drop(view);
    if changed.is_empty() {
        return Ok(());
    }
    if !force {
        let bytes: u64 = changed.iter().map(|c| c.length).sum();
        return Err(ApiError::new(
            ErrorKind::Conflict,
            format!(
                "{} changed since {}@{base} ({bytes} bytes differ: written to, or a receive cut short); pass --force to roll it back to {base} first",
                vdi.name(),
                vdi.name()
            ),
        ));
    }
    vdi.rollback(base)?;
    Ok(())
}

#[derive(Default)]
struct Applied {
    data: u64,
    zero: u64,
}

/// Applies the records after SIZE, up to and including END.
fn apply(reader: &mut Reader<'_>, vdi: &Vdi, applied: &mut Applied) -> ApiResult<()> {
    loop {
        match reader.next_record().map_err(stream_error)? {
            StreamRecord::Data { offset, data } => {
                vdi.write(&data, offset)?;
                applied.data += data.len() as u64;
            }
            StreamRecord::Zero { offset, length } => {
                vdi.write_zeroes(offset, length)?;
                applied.zero += length;
            }
            StreamRecord::Size(_) => {
                return Err(ApiError::internal("the reader let a second SIZE through"))
            }
            StreamRecord::End => return Ok(()),
        }
    }
}

fn stream_error(e: StreamError) -> ApiError {
    let kind = match e {
        StreamError::Io(_) => ErrorKind::Internal,
        _ => ErrorKind::Invalid,
    };
    ApiError::new(
        kind,
        format!("cannot receive: {e}; the target is left as it was"),
    )
}
