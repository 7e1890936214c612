//! Cross-checks the readers against images produced by the real `qemu-img`
//! and `qemu-io`.
//!
//! These tests need `qemu-img` and `qemu-io` on `PATH`. If they are missing
//! the tests fail, unless `PARALLAX_SKIP_QEMU_TESTS=1` is set, in which case
//! they are skipped with a message.

use std::path::{Path, PathBuf};
use std::process::Command;

use parallax_image::{open_image, parse_qcow2_header, DiskImage, ImageError, Qcow2Image};

const MIB: u64 = 1 << 20;

/// Returns whether the qemu tools are usable; panics if they are missing and
/// skipping was not requested.
fn have_qemu() -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    if !ok {
        if std::env::var_os("PARALLAX_SKIP_QEMU_TESTS").is_some_and(|v| v == "1") {
            eprintln!("qemu-img/qemu-io not found: skipping (PARALLAX_SKIP_QEMU_TESTS=1)");
        } else {
            panic!("qemu-img and qemu-io are required (set PARALLAX_SKIP_QEMU_TESTS=1 to skip)");
        }
    }
    ok
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn p(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// Deterministic xorshift64* generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

fn open(path: &Path) -> Box<dyn DiskImage> {
    match open_image(path) {
        Ok(img) => img,
        Err(e) => panic!("cannot open {}: {e}", path.display()),
    }
}

fn open_err(path: &Path) -> ImageError {
    match open_image(path) {
        Ok(img) => panic!("{} unexpectedly opened as {}", path.display(), img.format()),
        Err(e) => e,
    }
}

/// Reads the whole image in chunks of an odd size that straddles clusters.
fn read_all(img: &mut dyn DiskImage) -> Vec<u8> {
    let size = img.virtual_size();
    let mut out = vec![0x55u8; size as usize];
    let chunk = (MIB + 4097) as usize;
    let mut off = 0usize;
    while off < out.len() {
        let end = (off + chunk).min(out.len());
        img.read_at(&mut out[off..end], off as u64)
            .unwrap_or_else(|e| panic!("read {off}..{end}: {e}"));
        off = end;
    }
    out
}

/// What qemu itself says the guest sees.
fn qemu_export(image: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("export.raw");
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", p(image), p(&raw)],
    );
    std::fs::read(&raw).unwrap()
}

/// Random reads and zero queries, checked against `expected`.
fn check_random_access(img: &mut dyn DiskImage, expected: &[u8], rng: &mut Rng, rounds: usize) {
    let size = expected.len() as u64;
    for _ in 0..rounds {
        let off = rng.below(size);
        let len = rng.below((size - off).min(300_000) + 1);
        let mut buf = vec![0x55u8; len as usize];
        img.read_at(&mut buf, off).unwrap();
        let want = &expected[off as usize..(off + len) as usize];
        assert!(buf == want, "read of {len} bytes at {off} differs");
        if img.is_zero_range(off, len).unwrap() {
            assert!(
                want.iter().all(|&b| b == 0),
                "is_zero_range({off}, {len}) lied"
            );
        }
    }
}

/// Checks that every 64 KiB block reported as zero really is zero.
fn check_zero_soundness(img: &mut dyn DiskImage, expected: &[u8]) {
    let block = 64 * 1024;
    for (i, want) in expected.chunks(block).enumerate() {
        let off = (i * block) as u64;
        if img.is_zero_range(off, want.len() as u64).unwrap() {
            assert!(
                want.iter().all(|&b| b == 0),
                "block at {off} reported zero but is not"
            );
        }
    }
}

#[test]
fn qemu_io_written_images_match_qemu_export() {
    if !have_qemu() {
        return;
    }
    let configs: &[(&str, u32, u64)] = &[
        ("compat=1.1", 3, 65536),
        ("compat=1.1,cluster_size=4096", 3, 4096),
        ("compat=0.10", 2, 65536),
        ("compat=0.10,cluster_size=4096", 2, 4096),
        ("compat=1.1,cluster_size=2M", 3, 2 * MIB),
        ("compat=1.1,cluster_size=512", 3, 512),
    ];
    let mut rng = Rng(7);
    for &(opts, version, cluster_size) in configs {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("x.qcow2");
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, p(&image), "64M"],
        );
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0xab 1M 64k",
                "-c",
                "write -P 0xcd 4M 128k",
                "-c",
                "write -z 4M 64k",
                "-c",
                "write -z 8M 64k",
                "-c",
                "write -P 0x11 7000 3000",
                "-c",
                "write -P 0x5a 33554000 200000",
                "-c",
                "write -P 0x77 66584576 524288",
                p(&image),
            ],
        );
        let expected = qemu_export(&image, dir.path());
        assert_eq!(expected.len() as u64, 64 * MIB);
        // The export itself has the pattern, so the comparison is meaningful.
        assert!(expected[MIB as usize..][..65536].iter().all(|&b| b == 0xab));
        assert!(expected[7000..10000].iter().all(|&b| b == 0x11));

        let q = Qcow2Image::open(&image).unwrap();
        assert_eq!(q.header().version, version, "{opts}");
        assert_eq!(q.header().cluster_size(), cluster_size, "{opts}");

        let mut img = open(&image);
        assert_eq!(img.format(), "qcow2");
        assert_eq!(img.virtual_size(), 64 * MIB);
        let got = read_all(img.as_mut());
        assert!(
            got == expected,
            "{opts}: full read differs from qemu-img export"
        );

        let cs = cluster_size;
        assert!(img.is_zero_range(48 * MIB, 8 * MIB).unwrap(), "{opts}");
        assert!(!img.is_zero_range(MIB, 65536).unwrap(), "{opts}");
        assert!(!img.is_zero_range(0, 64 * MIB).unwrap(), "{opts}");
        if version == 3 && cs <= 65536 {
            // write -z on whole clusters of a v3 image sets the zero flag.
            assert!(img.is_zero_range(4 * MIB, 65536).unwrap(), "{opts}");
            assert!(img.is_zero_range(8 * MIB, 65536).unwrap(), "{opts}");
        }
        check_zero_soundness(img.as_mut(), &expected);
        check_random_access(img.as_mut(), &expected, &mut rng, 200);

        // Reads past the end are rejected, not clipped.
        let mut buf = [0u8; 1024];
        assert!(matches!(
            img.read_at(&mut buf, 64 * MIB - 512),
            Err(ImageError::OutOfRange { .. })
        ));
    }
}

/// A raw disk with random data, zero stretches and sparse small blocks.
fn random_raw(path: &Path, size: usize, rng: &mut Rng) -> Vec<u8> {
    let mut data = vec![0u8; size];
    let seg = 256 * 1024;
    for (i, chunk) in data.chunks_mut(seg).enumerate() {
        // Keep [2 MiB, 4 MiB) zero so that even 2 MiB clusters have a hole.
        if (8..16).contains(&i) {
            continue;
        }
        match rng.below(3) {
            0 => rng.fill(chunk),
            1 => {}
            _ => {
                for _ in 0..4 {
                    let at = rng.below(chunk.len() as u64) as usize;
                    let len = (rng.below(5000) as usize).min(chunk.len() - at);
                    rng.fill(&mut chunk[at..at + len]);
                }
            }
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn converted_random_raw_matches_byte_for_byte() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let mut rng = Rng(0xdead_beef);
    let data = random_raw(&raw, 6 * MIB as usize + 1536, &mut rng);

    // The raw file itself, through format detection.
    let mut img = open(&raw);
    assert_eq!(img.format(), "raw");
    assert_eq!(img.virtual_size(), data.len() as u64);
    assert!(read_all(img.as_mut()) == data);

    for opts in [
        "compat=1.1",
        "compat=0.10",
        "cluster_size=4096",
        "cluster_size=512",
        "cluster_size=2M",
        "cluster_size=16384,lazy_refcounts=on",
    ] {
        let image = dir.path().join("conv.qcow2");
        let _ = std::fs::remove_file(&image);
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                opts,
                p(&raw),
                p(&image),
            ],
        );
        let mut img = open(&image);
        assert_eq!(img.format(), "qcow2");
        assert_eq!(img.virtual_size(), data.len() as u64, "{opts}");
        assert!(read_all(img.as_mut()) == data, "{opts}: differs from raw");
        check_zero_soundness(img.as_mut(), &data);
        check_random_access(img.as_mut(), &data, &mut rng, 300);
        // qemu-img convert leaves all-zero stretches unallocated.
        let zero_blocks = (0..data.len() / 65536)
            .filter(|&i| img.is_zero_range(i as u64 * 65536, 65536).unwrap())
            .count();
        assert!(zero_blocks > 0, "{opts}: no zero block detected");
    }
}

#[test]
fn compressed_clusters_are_unsupported() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    // Compressible data (random bytes would be stored uncompressed).
    let mut data = vec![0u8; 4 * MIB as usize];
    for (i, b) in data[..MIB as usize].iter_mut().enumerate() {
        *b = b"parallax imports qcow2 "[i % 23] ^ (i / 4096) as u8;
    }
    std::fs::write(&raw, &data).unwrap();

    for (opts, name) in [
        ("compression_type=zlib", "zlib"),
        ("compression_type=zstd", "zstd"),
    ] {
        let image = dir.path().join(format!("{name}.qcow2"));
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                opts,
                p(&raw),
                p(&image),
            ],
        );
        let map = Command::new("qemu-img")
            .args(["map", "--output=json", p(&image)])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&map.stdout).contains("\"compressed\": true"),
            "qemu-img did not compress anything"
        );
        // The header is fine; the error comes when a compressed cluster is met.
        let mut img = open(&image);
        let mut buf = vec![0u8; 4096];
        match img.read_at(&mut buf, 12345) {
            Err(ImageError::Unsupported(msg)) => {
                assert!(
                    msg.starts_with("qcow2 compressed clusters are not supported"),
                    "{msg}"
                );
                assert!(msg.contains(name), "{msg}");
            }
            other => panic!("{name}: expected Unsupported, got {other:?}"),
        }
        assert!(matches!(
            img.is_zero_range(0, 4 * MIB),
            Err(ImageError::Unsupported(_))
        ));
        // The all-zero tail was not compressed, just left unallocated.
        img.read_at(&mut buf, 3 * MIB).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(img.is_zero_range(2 * MIB, 2 * MIB).unwrap());
    }
}

#[test]
fn unsupported_features_are_rejected_at_open() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&base), "8M"]);

    let overlay = d.join("overlay.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "qcow2",
            p(&overlay),
        ],
    );
    let luks = d.join("luks.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=swordfish",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            p(&luks),
            "8M",
        ],
    );
    let extl2 = d.join("extl2.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            p(&extl2),
            "8M",
        ],
    );
    let datafile = d.join("datafile.qcow2");
    let data_opt = format!("data_file={}", p(&d.join("data.raw")));
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &data_opt,
            p(&datafile),
            "8M",
        ],
    );

    let cases: [(&PathBuf, &[&str]); 4] = [
        (
            &overlay,
            &[
                "qcow2 images with a backing file are not supported: flatten it first with qemu-img convert",
                "base.qcow2",
            ],
        ),
        (&luks, &["LUKS", "not supported"]),
        (&extl2, &["extended L2 entries", "not supported"]),
        (&datafile, &["external data file", "not supported"]),
    ];
    for (path, needles) in cases {
        match open_err(path) {
            ImageError::Unsupported(msg) => {
                for n in needles {
                    assert!(msg.contains(n), "{msg:?} lacks {n:?}");
                }
                assert!(!msg.contains('\n'));
            }
            e => panic!("{}: expected Unsupported, got {e:?}", path.display()),
        }
    }
}

fn be64_at(bytes: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(bytes[off..off + 8].try_into().unwrap())
}

fn set_be64(bytes: &mut [u8], off: usize, v: u64) {
    bytes[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

fn set_be32(bytes: &mut [u8], off: usize, v: u32) {
    bytes[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn corrupted_qemu_images_give_errors() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&good), "64M"],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xab 1M 64k", p(&good)],
    );
    let pristine = std::fs::read(&good).unwrap();
    let header = parse_qcow2_header(&pristine).unwrap();
    assert_eq!(header.cluster_size(), 65536);
    let l1_off = header.l1_table_offset as usize;
    let l2_off = (be64_at(&pristine, l1_off) & 0x00ff_ffff_ffff_fe00) as usize;
    assert_ne!(l2_off, 0, "the write should have allocated an L2 table");
    // Guest cluster 16 (offset 1 MiB) is entry 16 of the first L2 table.
    let l2e_pos = l2_off + 16 * 8;
    assert_ne!(be64_at(&pristine, l2e_pos), 0);

    let variant = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| -> PathBuf {
        let mut bytes = pristine.clone();
        edit(&mut bytes);
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        path
    };
    let expect_malformed = |path: &Path, needle: &str| match open_err(path) {
        ImageError::Malformed(msg) => assert!(msg.contains(needle), "{msg:?} lacks {needle:?}"),
        e => panic!("{}: expected Malformed, got {e:?}", path.display()),
    };

    expect_malformed(&variant("t50", &|b| b.truncate(50)), "truncated");
    expect_malformed(&variant("t100", &|b| b.truncate(100)), "truncated");
    expect_malformed(
        &variant("t_l1", &|b| b.truncate(l1_off + 4)),
        "L1 table at offset",
    );
    expect_malformed(
        &variant("t_l2", &|b| b.truncate(l2_off + 100)),
        "L2 table at offset",
    );
    expect_malformed(
        &variant("l1_huge", &|b| set_be32(b, 36, u32::MAX)),
        "l1_size 4294967295",
    );
    expect_malformed(
        &variant("l1_small", &|b| set_be32(b, 36, 0)),
        "l1_size 0 is too small",
    );
    expect_malformed(
        &variant("l1_misaligned", &|b| set_be64(b, 40, l1_off as u64 + 8)),
        "l1_table_offset",
    );
    expect_malformed(
        &variant("rt_misaligned", &|b| {
            let v = be64_at(b, 48);
            set_be64(b, 48, v + 512)
        }),
        "refcount_table_offset",
    );
    expect_malformed(
        &variant("cluster_bits", &|b| set_be32(b, 20, 30)),
        "cluster_bits 30",
    );
    expect_malformed(
        &variant("header_length", &|b| set_be32(b, 100, 100)),
        "header_length 100",
    );
    expect_malformed(
        &variant("l1_entry", &|b| set_be64(b, l1_off, l2_off as u64 + 4096)),
        "not aligned",
    );
    match open_err(&variant("incompat", &|b| b[79] |= 0x40)) {
        ImageError::Unsupported(msg) => assert!(
            msg.contains("unknown incompatible feature bits: 6"),
            "{msg}"
        ),
        e => panic!("expected Unsupported, got {e:?}"),
    }

    // Bad magic: format detection falls back to raw; forcing qcow2 fails.
    let bad_magic = variant("bad_magic", &|b| b[0] = b'X');
    assert_eq!(open(&bad_magic).format(), "raw");
    assert!(matches!(
        Qcow2Image::open(&bad_magic),
        Err(ImageError::NotQcow2(_))
    ));
    assert!(matches!(
        parse_qcow2_header(&std::fs::read(&bad_magic).unwrap()),
        Err(ImageError::NotQcow2(_))
    ));
    // Shorter than the magic: raw.
    let tiny = variant("tiny", &|b| b.truncate(3));
    assert_eq!(open(&tiny).virtual_size(), 3);

    // An L2 entry pointing past the end of the file fails on read, not at
    // open, and does not read as zeros.
    let far = variant("l2_far", &|b| {
        set_be64(b, l2e_pos, 1 << 63 | 1 << 40);
    });
    let mut img = open(&far);
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 0).unwrap();
    match img.read_at(&mut buf, MIB) {
        Err(ImageError::Malformed(msg)) => {
            assert!(msg.contains("past the end of the file"), "{msg}")
        }
        other => panic!("expected Malformed, got {other:?}"),
    }
    // Setting the compressed bit on that entry is reported as such.
    let comp = variant("l2_comp", &|b| {
        let v = be64_at(b, l2e_pos);
        set_be64(b, l2e_pos, v | 1 << 62);
    });
    let mut img = open(&comp);
    assert!(matches!(
        img.read_at(&mut buf, MIB),
        Err(ImageError::Unsupported(_))
    ));
}

#[test]
fn random_corruption_of_a_real_image_never_panics() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p(&good),
            "2M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x42 0 100k",
            "-c",
            "write -z 200k 8k",
            "-c",
            "write -P 0x43 1M 300k",
            p(&good),
        ],
    );
    let pristine = std::fs::read(&good).unwrap();
    let mut rng = Rng(99);
    let path = dir.path().join("mutant.qcow2");
    let mut opened = 0;
    for _ in 0..400 {
        let mut bytes = pristine.clone();
        for _ in 0..=rng.below(3) {
            // Mostly hit the header and the metadata clusters after it.
            let limit = if rng.below(2) == 0 { 128 } else { 6 * 4096 };
            let pos = rng.below(limit.min(bytes.len() as u64)) as usize;
            bytes[pos] = rng.next() as u8;
        }
        if rng.below(8) == 0 {
            let len = rng.below(bytes.len() as u64) as usize;
            bytes.truncate(len);
        }
        let _ = parse_qcow2_header(&bytes);
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(mut img) = open_image(&path) {
            opened += 1;
            let size = img.virtual_size().min(4 * MIB);
            let mut buf = vec![0u8; 64 * 1024];
            let mut off = 0;
            while off < size {
                let len = (size - off).min(buf.len() as u64) as usize;
                let _ = img.read_at(&mut buf[..len], off);
                let _ = img.is_zero_range(off, len as u64);
                off += len as u64;
            }
        }
    }
    assert!(opened > 0);
}
