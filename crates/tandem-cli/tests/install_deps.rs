//! `scripts/install-deps` decides what a machine lacks by asking the package
//! manager, never by looking for files. These tests put a `dpkg-query` on
//! PATH that reports a chosen set of packages as installed and check what
//! the script would install (`--dry-run`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/install-deps")
}

/// A `dpkg-query` that knows `installed` as installed and `removed` as
/// removed with its configuration left behind (what `apt-get remove` leaves);
/// an installed `nodejs` provides npm when `nodejs_provides_npm`.
fn shim(dir: &Path, installed: &[&str], removed: &[&str], nodejs_provides_npm: bool) {
    let body = format!(
        r#"#!/bin/sh
for a; do pkg="$a"; done
case "$*" in *Provides*) [ "$pkg" = nodejs ] && [ {provides} = 1 ] && printf 'nodejs-dev, nodejs-legacy, npm (= 10.8.2)'; exit 0 ;; esac
case " {installed} " in *" $pkg "*) printf 'install ok installed'; exit 0 ;; esac
case " {removed} " in *" $pkg "*) printf 'deinstall ok config-files'; exit 0 ;; esac
echo "dpkg-query: no packages found matching $pkg" >&2
exit 1
"#,
        installed = installed.join(" "),
        removed = removed.join(" "),
        provides = u8::from(nodejs_provides_npm),
    );
    let path = dir.join("dpkg-query");
    std::fs::write(&path, body).expect("write shim");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
}

fn dry_run(installed: &[&str], removed: &[&str], groups: &[&str]) -> String {
    dry_run_with(installed, removed, groups, false)
}

fn dry_run_with(
    installed: &[&str],
    removed: &[&str],
    groups: &[&str],
    npm_in_nodejs: bool,
) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    shim(dir.path(), installed, removed, npm_in_nodejs);
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg(script())
        .arg("--dry-run")
        .args(groups)
        .env("PATH", path)
        .output()
        .expect("run install-deps");
    assert!(
        out.status.success(),
        "install-deps failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_machine_without_the_packages_gets_them_all() {
    assert_eq!(
        dry_run(&[], &[], &["build", "test"]),
        "would install: build-essential cmake libclang-dev python3 python3-venv python3-pip fonts-dejavu-core nodejs npm chromium redis-server"
    );
}

/// The fresh image carries `libclang-cpp14` (whose file a glob for
/// `libclang*.so*` matches) but not libclang itself: the package query is
/// not fooled.
#[test]
fn libclang_cpp_is_not_libclang() {
    let fresh = [
        "build-essential",
        "libclang-cpp14",
        "python3",
        "python3-venv",
        "python3-pip",
    ];
    assert_eq!(
        dry_run(&fresh, &[], &["build"]),
        "would install: cmake libclang-dev"
    );
}

#[test]
fn removed_packages_count_as_missing_and_a_complete_machine_needs_nothing() {
    let all = [
        "build-essential",
        "cmake",
        "python3",
        "python3-venv",
        "python3-pip",
        "fonts-dejavu-core",
        "nodejs",
        "npm",
        "chromium",
        "redis-server",
    ];
    assert_eq!(
        dry_run(&all, &["libclang-dev"], &["build", "test"]),
        "would install: libclang-dev"
    );
    let mut everything = all.to_vec();
    everything.push("libclang-dev");
    assert_eq!(
        dry_run(&everything, &[], &["build", "test"]),
        "nothing to install"
    );
    // The default group is `build`.
    assert_eq!(
        dry_run(&[], &[], &[]),
        "would install: build-essential cmake libclang-dev"
    );
}

/// NodeSource's nodejs carries npm (and declares it); Debian's does not.
#[test]
fn npm_comes_with_nodesource_nodejs_or_as_a_package() {
    let base = [
        "python3",
        "python3-venv",
        "python3-pip",
        "fonts-dejavu-core",
    ];
    let mut with_node = base.to_vec();
    with_node.push("nodejs");
    assert_eq!(
        dry_run_with(&with_node, &[], &["test"], true),
        "would install: chromium redis-server"
    );
    assert_eq!(
        dry_run_with(&with_node, &[], &["test"], false),
        "would install: npm chromium redis-server"
    );
}
