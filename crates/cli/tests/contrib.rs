//! The files in `contrib/` checked by the tools their users run: the
//! systemd unit by `systemd-analyze verify` (with `ExecStart` pointed at
//! the binary under test), the libvirt domain by `virt-xml-validate`
//! against libvirt's schema. `scripts/install-deps.sh` installs both tools
//! (`systemd`, `libvirt-clients` and `libxml2-utils`); without them these
//! tests fail, unless `PARALLAX_SKIP_NBD_TESTS=1`, which skips them.
//! (The example settings file, `contrib/parallax.toml`, is started with
//! in `nbd_clients.rs`.)

use std::path::{Path, PathBuf};
use std::process::Command;

fn contrib(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../contrib")
        .join(name)
}

/// True when `tool` runs; panics when it does not, unless skipping.
fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found && std::env::var("PARALLAX_SKIP_NBD_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped: {tool} is not installed");
        return false;
    }
    assert!(found, "{tool} is missing: run scripts/install-deps.sh");
    true
}

#[test]
fn the_systemd_unit_verifies() {
    if !have("systemd-analyze") {
        return;
    }
    let unit = std::fs::read_to_string(contrib("parallax.service")).expect("read the unit");
    assert!(
        unit.contains("Type=notify"),
        "the daemon tells systemd when it is ready"
    );
    assert!(unit
        .contains("ExecStart=/usr/local/bin/parallax serve --config /etc/parallax/parallax.toml"));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("parallax.service");
    let here = unit.replace("/usr/local/bin/parallax", env!("CARGO_BIN_EXE_parallax"));
    std::fs::write(&path, here).expect("write the unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{said}"
    );
    assert!(
        !said.contains("parallax.service"),
        "systemd-analyze has something to say about the unit:\n{said}"
    );
}

#[test]
fn the_libvirt_domain_validates() {
    if !have("virt-xml-validate") {
        return;
    }
    let out = Command::new("virt-xml-validate")
        .arg(contrib("libvirt-domain.xml"))
        .arg("domain")
        .output()
        .expect("run virt-xml-validate");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let xml = std::fs::read_to_string(contrib("libvirt-domain.xml")).expect("read");
    for disk in [
        "name='vm1' tls='yes'",
        "name='vm1-data'",
        "name='vm1@gold'",
        "type='vhostuser'",
    ] {
        assert!(xml.contains(disk), "{disk}");
    }
}
