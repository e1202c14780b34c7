//! Tells the tests whether they may mount filesystems: `drfs_root` is set when the build
//! runs as root, and the tests that mount FUSE filesystems are ignored without it (so
//! `cargo test` as any user runs the library tests). Rebuilt when the user changes.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(drfs_root)");
    println!("cargo::rerun-if-changed=build.rs");
    for v in ["USER", "SUDO_USER", "HOME"] {
        println!("cargo::rerun-if-env-changed={v}");
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if root {
        println!("cargo::rustc-cfg=drfs_root");
    }
}
