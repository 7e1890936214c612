//! Retention of scheduled snapshots, in the style of backup tools (restic's
//! `forget --keep-*`): keep the newest N; and for each of the last N
//! minutes (hours, days, months) that hold scheduled snapshots, the newest
//! snapshot of that minute (hour, day, month). A snapshot kept by any rule
//! is kept. Buckets are UTC; months are calendar months. Snapshots taken by
//! hand are never considered. With every rule at 0 nothing expires.

use crate::time::civil_from_days;
use parallax_format::Schedule;
use std::collections::HashSet;

const MINUTE: u64 = 60_000_000_000;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

fn month(ns: u64) -> u64 {
    let (y, m, _) = civil_from_days((ns / DAY) as i64);
    (y * 12) as u64 + u64::from(m)
}

/// The ids among `snapshots` (scheduled ones: (id, created_ns), oldest
/// first) that the rules of `schedule` do not keep.
pub fn expired(schedule: &Schedule, snapshots: &[(u64, u64)]) -> Vec<u64> {
    let rules: [(u32, &dyn Fn(u64) -> u64); 4] = [
        (schedule.keep_minutely, &|t| t / MINUTE),
        (schedule.keep_hourly, &|t| t / HOUR),
        (schedule.keep_daily, &|t| t / DAY),
        (schedule.keep_monthly, &month),
    ];
    if schedule.keep_last == 0 && rules.iter().all(|(n, _)| *n == 0) {
        return Vec::new();
    }
    let mut keep: HashSet<u64> = snapshots
        .iter()
        .rev()
        .take(schedule.keep_last as usize)
        .map(|(id, _)| *id)
        .collect();
    for (n, bucket) in rules {
        let mut last = None;
        let mut kept = 0;
        for &(id, t) in snapshots.iter().rev() {
            if kept == n {
                break;
            }
            let b = bucket(t);
            if last != Some(b) {
                keep.insert(id);
                last = Some(b);
                kept += 1;
            }
        }
    }
    snapshots
        .iter()
        .filter(|(id, _)| !keep.contains(id))
        .map(|(id, _)| *id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(last: u32, minutely: u32, hourly: u32) -> Schedule {
        Schedule {
            every_ns: 1,
            keep_last: last,
            keep_minutely: minutely,
            keep_hourly: hourly,
            ..Schedule::default()
        }
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let snaps: Vec<(u64, u64)> = (1..=10).map(|i| (i, i * 1000)).collect();
        assert_eq!(expired(&sched(3, 0, 0), &snaps), vec![1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(expired(&sched(20, 0, 0), &snaps), Vec::<u64>::new());
        // No rule at all: keep everything.
        assert_eq!(expired(&sched(0, 0, 0), &snaps), Vec::<u64>::new());
    }

    #[test]
    fn buckets_keep_the_newest_of_each() {
        // Every 10 s for 3 minutes: 18 snapshots, ids 1..=18, minute m
        // holds ids 6m+1..=6m+6.
        let snaps: Vec<(u64, u64)> = (0..18).map(|i| (i + 1, i * 10_000_000_000)).collect();
        // keep-minutely 2: newest of minute 2 (18) and of minute 1 (12).
        let mut e = expired(&sched(0, 2, 0), &snaps);
        e.sort();
        let want: Vec<u64> = (1..=18).filter(|i| *i != 18 && *i != 12).collect();
        assert_eq!(e, want);
        // With keep-last 1 as well, 18 is kept once; keep-hourly 1 adds
        // nothing (18 is the newest of the hour).
        assert_eq!(expired(&sched(1, 2, 1), &snaps).len(), 16);
        // keep-minutely 5 covers all three minutes.
        assert_eq!(expired(&sched(0, 5, 0), &snaps).len(), 15);
    }

    #[test]
    fn months_are_calendar_months() {
        // 2024-01-31 23:59 and 2024-02-01 00:01 UTC fall in two months.
        let jan31 = 1_706_745_540_000_000_000;
        let feb1 = jan31 + 2 * MINUTE;
        let s = Schedule {
            every_ns: 1,
            keep_monthly: 2,
            ..Schedule::default()
        };
        assert!(expired(&s, &[(1, jan31), (2, feb1)]).is_empty());
        let s = Schedule {
            keep_monthly: 1,
            ..s
        };
        assert_eq!(expired(&s, &[(1, jan31), (2, feb1)]), vec![1]);
    }
}
