//! A crash-simulating device for tests.
//!
//! It keeps two images: the *durable* one (what survives a power cut) and
//! the *live* one (what reads see). Writes go to the live image and to a
//! list of pending writes; a flush moves the pending writes into the durable
//! image. A power cut (by hand with [`CrashDevice::cut_power`], or armed with
//! [`CrashDevice::crash_at_flush`] / [`CrashDevice::crash_at_write`]) decides
//! the fate of each pending write according to a [`CrashMode`] and then
//! fails every later call with EIO, as a dead disk would. The durable image
//! is then what a restarted machine sees ([`CrashDevice::durable_image`]).
//!
//! Faults ([`Fault`]) make a chosen write or flush fail with EIO or ENOSPC
//! without cutting power, to test error paths.

use crate::{check_range, BlockDevice};
use parking_lot::Mutex;
use std::io;

/// What a power cut does to writes that were not flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every write since the last flush is lost.
    DropAll,
    /// Each write since the last flush survives with probability 1/2,
    /// chosen by a generator seeded with the value.
    KeepRandom(u64),
    /// Like `KeepRandom`, and one of the pending writes (chosen by the seed)
    /// is torn: only its first half reaches the durable image.
    TearOne(u64),
}

/// An injected I/O failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The write issued after `after_writes` more successful writes fails with EIO.
    WriteEio { after_writes: u64 },
    /// The write issued after `after_writes` more successful writes fails with ENOSPC.
    WriteEnospc { after_writes: u64 },
    /// The next flush fails with EIO (pending writes stay pending).
    FlushEio,
}

#[derive(Debug, Clone, Copy)]
enum Trigger {
    Flush(u64),
    Write(u64),
}

struct Inner {
    durable: Vec<u8>,
    live: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    writes: u64,
    flushes: u64,
    trigger: Option<(Trigger, CrashMode)>,
    powered: bool,
    fault: Option<Fault>,
}

/// Called with the flush's number when a flush starts.
pub type FlushHook = Box<dyn Fn(u64) + Send + Sync>;

/// See the module documentation.
pub struct CrashDevice {
    inner: Mutex<Inner>,
    /// Runs at the start of every flush, before the device's lock is
    /// taken: a test can act (write through the engine, start a thread)
    /// at an exact point of the code that flushes.
    flush_hook: Mutex<Option<FlushHook>>,
}

/// Puts `devices` on one power supply: when the `at`-th flush of any of
/// them starts (counting the flushes of all, from 0), power is cut on all
/// of them at once, in `mode`. Replaces their flush hooks.
pub fn share_power(devices: &[&std::sync::Arc<CrashDevice>], at: u64, mode: CrashMode) {
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let all: Vec<std::sync::Weak<CrashDevice>> = devices
        .iter()
        .map(|d| std::sync::Arc::downgrade(d))
        .collect();
    for dev in devices {
        let (count, all) = (count.clone(), all.clone());
        dev.on_flush(Some(Box::new(move |_| {
            if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == at {
                for d in all.iter().filter_map(|d| d.upgrade()) {
                    d.cut_power(mode);
                }
            }
        })));
    }
}

/// SplitMix64: a tiny deterministic generator, enough to pick subsets (and
/// for tests and benchmarks to pick offsets and contents).
pub struct SplitMix(pub u64);
impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn power_off() -> io::Error {
    io::Error::other("simulated power cut: device is off")
}

impl CrashDevice {
    /// A zero-filled device of `len` bytes, everything durable.
    pub fn new(len: u64) -> Self {
        Self::from_durable(vec![0; len as usize])
    }

    /// A device whose durable (and live) content is `image`: a machine
    /// restarting after a crash.
    pub fn from_durable(image: Vec<u8>) -> Self {
        CrashDevice {
            inner: Mutex::new(Inner {
                live: image.clone(),
                durable: image,
                pending: Vec::new(),
                writes: 0,
                flushes: 0,
                trigger: None,
                powered: true,
                fault: None,
            }),
            flush_hook: Mutex::new(None),
        }
    }

    /// Sets (or clears) the hook run at the start of every flush, with the
    /// number the flush will have (see [`CrashDevice::crash_at_flush`]).
    pub fn on_flush(&self, hook: Option<FlushHook>) {
        *self.flush_hook.lock() = hook;
    }

    /// Cuts power when flush number `n` (counting from 0 since creation)
    /// starts: that flush and everything after it fail.
    pub fn crash_at_flush(&self, n: u64, mode: CrashMode) {
        self.inner.lock().trigger = Some((Trigger::Flush(n), mode));
    }

    /// Cuts power when write number `n` (counting from 0) is issued: that
    /// write and everything after it fail.
    pub fn crash_at_write(&self, n: u64, mode: CrashMode) {
        self.inner.lock().trigger = Some((Trigger::Write(n), mode));
    }

    /// Cuts power now.
    pub fn cut_power(&self, mode: CrashMode) {
        let mut inner = self.inner.lock();
        Self::cut(&mut inner, mode);
    }

    /// Arms a fault.
    pub fn inject(&self, fault: Fault) {
        self.inner.lock().fault = Some(fault);
    }

    /// Whether power has been cut.
    pub fn is_crashed(&self) -> bool {
        !self.inner.lock().powered
    }

    /// Number of flushes and writes issued so far.
    pub fn counters(&self) -> (u64, u64) {
        let inner = self.inner.lock();
        (inner.flushes, inner.writes)
    }

    /// What a restarted machine would read.
    pub fn durable_image(&self) -> Vec<u8> {
        self.inner.lock().durable.clone()
    }

    fn cut(inner: &mut Inner, mode: CrashMode) {
        if !inner.powered {
            return;
        }
        inner.powered = false;
        let pending = std::mem::take(&mut inner.pending);
        let (mut rng, tear) = match mode {
            CrashMode::DropAll => return,
            CrashMode::KeepRandom(seed) => (SplitMix(seed), None),
            CrashMode::TearOne(seed) => {
                let mut rng = SplitMix(seed);
                let victim = if pending.is_empty() {
                    None
                } else {
                    Some((rng.next_u64() % pending.len() as u64) as usize)
                };
                (rng, victim)
            }
        };
        for (index, (offset, data)) in pending.iter().enumerate() {
            let start = *offset as usize;
            if Some(index) == tear {
                let half = data.len() / 2;
                inner.durable[start..start + half].copy_from_slice(&data[..half]);
            } else if rng.next_u64() & 1 == 1 {
                inner.durable[start..start + data.len()].copy_from_slice(data);
            }
        }
    }
}

impl BlockDevice for CrashDevice {
    fn len(&self) -> u64 {
        self.inner.lock().live.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let inner = self.inner.lock();
        if !inner.powered {
            return Err(power_off());
        }
        check_range(inner.live.len() as u64, offset, buf.len() as u64)?;
        let start = offset as usize;
        buf.copy_from_slice(&inner.live[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut inner = self.inner.lock();
        if !inner.powered {
            return Err(power_off());
        }
        check_range(inner.live.len() as u64, offset, buf.len() as u64)?;
        if let Some((Trigger::Write(n), mode)) = inner.trigger {
            if inner.writes >= n {
                Self::cut(&mut inner, mode);
                return Err(power_off());
            }
        }
        match inner.fault {
            Some(Fault::WriteEio { after_writes: 0 }) => {
                inner.fault = None;
                return Err(io::Error::from(rustix::io::Errno::IO));
            }
            Some(Fault::WriteEnospc { after_writes: 0 }) => {
                inner.fault = None;
                return Err(io::Error::from(rustix::io::Errno::NOSPC));
            }
            Some(Fault::WriteEio { after_writes }) => {
                inner.fault = Some(Fault::WriteEio {
                    after_writes: after_writes - 1,
                })
            }
            Some(Fault::WriteEnospc { after_writes }) => {
                inner.fault = Some(Fault::WriteEnospc {
                    after_writes: after_writes - 1,
                })
            }
            _ => {}
        }
        inner.writes += 1;
        let start = offset as usize;
        inner.live[start..start + buf.len()].copy_from_slice(buf);
        inner.pending.push((offset, buf.to_vec()));
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if let Some(hook) = &*self.flush_hook.lock() {
            let n = self.inner.lock().flushes;
            hook(n);
        }
        let mut inner = self.inner.lock();
        if !inner.powered {
            return Err(power_off());
        }
        if let Some((Trigger::Flush(n), mode)) = inner.trigger {
            if inner.flushes >= n {
                Self::cut(&mut inner, mode);
                return Err(power_off());
            }
        }
        if inner.fault == Some(Fault::FlushEio) {
            inner.fault = None;
            return Err(io::Error::from(rustix::io::Errno::IO));
        }
        inner.flushes += 1;
        let pending = std::mem::take(&mut inner.pending);
        for (offset, data) in pending {
            let start = offset as usize;
            inner.durable[start..start + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // A discard is a write of zeros as far as durability goes.
        check_range(self.len(), offset, len)?;
        self.write_at(&vec![0; len as usize], offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unflushed_writes_are_dropped() {
        let dev = CrashDevice::new(16384);
        dev.write_at(&[1; 4096], 0).unwrap();
        dev.flush().unwrap();
        dev.write_at(&[2; 4096], 0).unwrap();
        dev.write_at(&[3; 4096], 4096).unwrap();
        let mut buf = [0; 4096];
        dev.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [2; 4096]);
        dev.cut_power(CrashMode::DropAll);
        assert!(dev.read_at(&mut buf, 0).is_err());
        assert!(dev.write_at(&buf, 0).is_err());
        let image = dev.durable_image();
        assert!(image[..4096].iter().all(|&b| b == 1));
        assert!(image[4096..8192].iter().all(|&b| b == 0));
    }

    #[test]
    fn torn_write_keeps_first_half_only() {
        let dev = CrashDevice::new(8192);
        dev.write_at(&[9; 4096], 4096).unwrap();
        dev.cut_power(CrashMode::TearOne(1));
        let image = dev.durable_image();
        assert!(image[4096..6144].iter().all(|&b| b == 9));
        assert!(image[6144..].iter().all(|&b| b == 0));
    }

    #[test]
    fn keep_random_keeps_some_and_drops_some() {
        let dev = CrashDevice::new(4096 * 64);
        for i in 0..64u64 {
            dev.write_at(&[1; 4096], i * 4096).unwrap();
        }
        dev.cut_power(CrashMode::KeepRandom(7));
        let image = dev.durable_image();
        let kept = (0..64).filter(|i| image[i * 4096] == 1).count();
        assert!(kept > 0 && kept < 64, "kept {kept} of 64");
    }

    #[test]
    fn armed_crash_at_flush_and_faults() {
        let dev = CrashDevice::new(8192);
        dev.crash_at_flush(1, CrashMode::DropAll);
        dev.write_at(&[1; 10], 0).unwrap();
        dev.flush().unwrap();
        dev.write_at(&[2; 10], 0).unwrap();
        assert!(dev.flush().is_err());
        assert!(dev.is_crashed());
        assert_eq!(dev.durable_image()[0], 1);

        let dev = CrashDevice::new(8192);
        dev.inject(Fault::WriteEnospc { after_writes: 1 });
        dev.write_at(&[1; 10], 0).unwrap();
        let err = dev.write_at(&[1; 10], 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        dev.write_at(&[1; 10], 0).unwrap();
        dev.inject(Fault::FlushEio);
        assert!(dev.flush().is_err());
        dev.flush().unwrap();
        assert_eq!(dev.durable_image()[0], 1);
    }
}
