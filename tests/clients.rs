//! Real clients and other people's test suites through the mount: qemu-io with O_DIRECT,
//! qemu-img, fio with verification, ext4 inside a loop-mounted image, fsx (crate) in
//! default and block mode, and pjdfstest (crate). Each must pass as it does natively.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn qemu_io_odirect_patterns_read_back() {
    let f = Fixture::new("qemuio");
    f.mount(&[]);
    let qio = need("qemu-io");
    let img = f.m("a.raw");
    ok(Command::new(need("qemu-img"))
        .args(["create", "-f", "raw"])
        .arg(&img)
        .arg("1G"));
    ok(Command::new(&qio)
        .args(["-f", "raw", "-t", "none", "-i", "native"])
        .args([
            "-c",
            "write -P 0xab 0 64M",
            "-c",
            "write -P 0xcd 128M 4k",
            "-c",
            "write -P 0x5a 1020M 4M",
            "-c",
            "write -P 0x11 300M 512",
            "-c",
            "flush",
        ])
        .arg(&img));
    ok(Command::new(&qio)
        .args(["-f", "raw", "-t", "none", "-i", "native"])
        .args([
            "-c",
            "read -P 0xab 0 64M",
            "-c",
            "read -P 0xcd 128M 4k",
            "-c",
            "read -P 0x5a 1020M 4M",
            "-c",
            "read -P 0x11 300M 512",
            "-c",
            "read -P 0 64M 64M",
        ])
        .arg(&img));
    // A wrong pattern must fail: the check bites.
    let bad = Command::new(&qio)
        .args(["-f", "raw", "-t", "none", "-c", "read -P 0xac 0 4k"])
        .arg(&img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(text.contains("Pattern verification failed"), "{text}");
    // Same bytes on the store itself.
    ok(Command::new(&qio)
        .args([
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0x5a 1020M 4M",
            "-c",
            "read -P 0xab 0 64M",
        ])
        .arg(f.s("a.raw")));
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn qemu_img_creates_converts_and_checks_qcow2() {
    let f = Fixture::new("qemuimg");
    f.mount(&[]);
    let qimg = need("qemu-img");
    let qio = need("qemu-io");
    let src = f.root.join("src.raw");
    ok(Command::new(&qimg)
        .args(["create", "-f", "raw"])
        .arg(&src)
        .arg("256M"));
    ok(Command::new(&qio)
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x42 1M 8M",
            "-c",
            "write -P 0x17 200M 1M",
        ])
        .arg(&src));
    ok(Command::new(&qimg)
        .args(["create", "-f", "qcow2"])
        .arg(f.m("new.qcow2"))
        .arg("1G"));
    ok(Command::new(&qio)
        .args([
            "-f",
            "qcow2",
            "-t",
            "none",
            "-c",
            "write -P 0x77 0 4M",
            "-c",
            "flush",
        ])
        .arg(f.m("new.qcow2")));
    ok(Command::new(&qimg)
        .args(["convert", "-f", "raw", "-O", "qcow2", "-t", "none"])
        .arg(&src)
        .arg(f.m("conv.qcow2")));
    for img in ["new.qcow2", "conv.qcow2"] {
        let out = ok(Command::new(&qimg).arg("check").arg(f.m(img)));
        assert!(String::from_utf8_lossy(&out.stdout).contains("No errors"));
    }
    let out = ok(Command::new(&qimg)
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&src)
        .arg(f.m("conv.qcow2")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
    // Through the mount and on the store: the same image.
    ok(Command::new(&qimg)
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(f.m("conv.qcow2"))
        .arg(f.s("conv.qcow2")));
    let out = ok(Command::new(&qimg)
        .args(["map", "--output=json"])
        .arg(f.m("conv.qcow2")));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"data\": false"),
        "holes visible to qemu-img map"
    );
    f.unmount();
}

fn fio(dir: &std::path::Path, args: &[&str]) {
    let mut cmd = Command::new(need("fio"));
    cmd.current_dir(dir)
        .arg(format!("--directory={}", dir.display()))
        .args(args);
    ok(&mut cmd);
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn fio_verify_jobs_pass_and_survive_remount() {
    let f = Fixture::new("fio");
    f.mount(&[]);
    let v = [
        "--size=128M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--direct=1",
        "--ioengine=libaio",
    ];
    let job = |name: &str, extra: &[&str]| {
        let mut a = vec![format!("--name={name}")];
        a.extend(v.iter().map(|s| s.to_string()));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| fio(&f.mnt, &a.iter().map(String::as_str).collect::<Vec<_>>());
    run(job(
        "v_seq",
        &[
            "--filename=v_seq.dat",
            "--rw=write",
            "--bs=1M",
            "--iodepth=4",
            "--do_verify=1",
            "--verify_interval=4096",
        ],
    ));
    run(job(
        "v_rand",
        &[
            "--filename=v_rand.dat",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--do_verify=1",
            "--verify_backlog=4096",
        ],
    ));
    run(job(
        "v_randread",
        &[
            "--filename=v_seq.dat",
            "--rw=randread",
            "--bs=4k",
            "--iodepth=16",
        ],
    ));
    run(job(
        "v_buffered",
        &[
            "--filename=v_buf.dat",
            "--rw=randwrite",
            "--bs=16k",
            "--direct=0",
            "--ioengine=psync",
            "--do_verify=1",
        ],
    ));
    run(job(
        "v_persist",
        &[
            "--filename=v_persist.dat",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--do_verify=0",
        ],
    ));
    f.unmount();
    f.mount(&[]);
    run(job(
        "v_persist",
        &[
            "--filename=v_persist.dat",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--verify_only",
        ],
    ));
    // The verification bites: corrupt one block on the store, the same check fails.
    f.unmount();
    sh(&format!(
        "dd if=/dev/zero of={} bs=4096 seek=777 count=1 conv=notrunc status=none",
        f.s("v_persist.dat").display()
    ));
    f.mount(&[]);
    let mut a = job(
        "v_persist",
        &[
            "--filename=v_persist.dat",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--verify_only",
        ],
    );
    a.insert(0, format!("--directory={}", f.mnt.display()));
    let out = Command::new(need("fio"))
        .current_dir(&f.mnt)
        .args(&a)
        .output()
        .unwrap();
    assert!(!out.status.success(), "fio verify missed a corrupted block");
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn ext4_in_an_image_on_the_mount() {
    let f = Fixture::new("ext4");
    f.mount(&[]);
    let img = f.m("ext4.img");
    let inner = f.root.join("inner");
    fs::create_dir(&inner).unwrap();
    make_ext4(&img, 512 << 20, &[]);
    ok(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&inner));
    let result = std::panic::catch_unwind(|| {
        sh(&format!(
            "cd {d} && mkdir -p a/b && for i in $(seq 1 50); do head -c $((i*37000)) /dev/urandom > a/b/f$i; done && \
             dd if=/dev/urandom of=big bs=1M count=64 status=none && sha256sum a/b/* big > ../sums && sync",
            d = inner.display()
        ));
    });
    let _ = Command::new("umount").arg(&inner).status();
    result.unwrap();
    ok(Command::new(need("e2fsck")).args(["-fn"]).arg(&img));
    ok(Command::new("mount")
        .args(["-o", "ro,loop"])
        .arg(&img)
        .arg(&inner));
    let check = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "cd {} && sha256sum -c --quiet ../sums",
            inner.display()
        ))
        .output()
        .unwrap();
    let _ = Command::new("umount").arg(&inner).status();
    assert!(
        check.status.success(),
        "files read back differ: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    f.unmount();
    ok(Command::new(need("e2fsck"))
        .args(["-fn"])
        .arg(f.s("ext4.img")));
}

const FSX_BLOCK: &str = "blockmode = true\nnosizechecks = true\n[opsize]\nalign = 4096\nmax = 1048576\n\
[weights]\nclose_open = 0\nread = 10\nwrite = 10\nmapread = 5\nmapwrite = 5\ninvalidate = 1\n\
truncate = 0\nfsync = 1\nfdatasync = 1\nposix_fallocate = 0\npunch_hole = 0\n";

fn fsx_ops() -> String {
    std::env::var("DRFS_FSX_OPS").unwrap_or_else(|_| "100000".into())
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn fsx_default_mode() {
    let f = Fixture::new("fsx");
    f.mount(&[]);
    let art = f.root.join("fsx-art");
    fs::create_dir(&art).unwrap();
    let out = ok(Command::new(need("fsx"))
        .args(["-N", &fsx_ops(), "-S", "42", "-P"])
        .arg(&art)
        .arg(f.m("fsx.dat")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("A-OK"));
    f.unmount();
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn fsx_block_mode_on_a_preallocated_image() {
    let f = Fixture::new("fsxblk");
    f.mount(&[]);
    let art = f.root.join("fsx-art");
    fs::create_dir(&art).unwrap();
    let cfg = f.root.join("block.toml");
    fs::write(&cfg, FSX_BLOCK).unwrap();
    ok(Command::new(need("fallocate"))
        .args(["-l", "64M"])
        .arg(f.m("disk.img")));
    let out = ok(Command::new(need("fsx"))
        .arg("-f")
        .arg(&cfg)
        .args(["-N", &fsx_ops(), "-S", "1", "-P"])
        .arg(&art)
        .arg(f.m("disk.img")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("A-OK"));
    f.unmount();
}

/// `drfs mount --store-io direct`: buffered clients' I/O goes to O_DIRECT store
/// descriptors (seen in the daemon's fdinfo), unaligned I/O falls back to the buffered
/// twin, and fsx and fio's buffered verify pass on it. And every mount raises the
/// kernel's FUSE request cap to 1024 pages.
#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn the_direct_store_io_option_passes_fsx_and_a_buffered_fio_verify() {
    let f = Fixture::new("storeio");
    f.mount(&["--store-io", "direct"]);
    let limit = fs::read_to_string("/proc/sys/fs/fuse/max_pages_limit").unwrap();
    assert!(limit.trim().parse::<u32>().unwrap() >= 1024, "{limit}");
    let file = fs::File::create(f.m("probe.dat")).unwrap();
    let pid = daemons_of(&f.mnt)[0];
    let direct_fds = fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let info = fs::read_to_string(e.path()).ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            let flags = u32::from_str_radix(flags.trim(), 8).ok()?;
            let target =
                fs::read_link(format!("/proc/{pid}/fd/{}", e.file_name().to_str()?)).ok()?;
            (target == f.s("probe.dat") && flags & libc::O_DIRECT as u32 != 0).then_some(())
        })
        .count();
    assert!(
        direct_fds > 0,
        "no O_DIRECT store descriptor for a buffered open"
    );
    drop(file);
    let art = f.root.join("fsx-art");
    fs::create_dir(&art).unwrap();
    let out = ok(Command::new(need("fsx"))
        .args(["-N", "15000", "-S", "7", "-P"])
        .arg(&art)
        .arg(f.m("fsx.dat")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("A-OK"));
    fio(
        &f.mnt,
        &[
            "--name=v_buf_direct",
            "--filename=v_buf.dat",
            "--size=64M",
            "--rw=randwrite",
            "--bs=1M",
            "--ioengine=psync",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
        ],
    );
    f.unmount();
}

const PJD_CONF: &str = "[features]\nposix_fallocate = {}\nutime_now = {}\nutimensat = {}\nrename_ctime = {}\n\
[settings]\nnaptime = 0.01\nallow_remount = false\n\
[dummy_auth]\nentries = [ [\"nobody\", \"nogroup\"], [\"daemon\", \"daemon\"] ]\n";

/// pjdfstest: zero failures. Skips, and why: `*::erofs_*` need a remountable read-only
/// filesystem and `*::exdev_*` a second filesystem (both skipped natively too);
/// `link::link_count_max` is skipped because glibc's pathconf(_PC_LINK_MAX) does not know
/// FUSE and answers 127, which pjdfstest treats as "unknown".
#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn pjdfstest_has_no_failures() {
    let f = Fixture::new("pjd");
    fs::set_permissions(&f.root, fs::Permissions::from_mode(0o755)).unwrap();
    f.mount(&["--allow-other"]);
    fs::set_permissions(&f.mnt, fs::Permissions::from_mode(0o777)).unwrap();
    let conf = f.root.join("pjd.toml");
    fs::write(&conf, PJD_CONF).unwrap();
    let out = Command::new(need("pjdfstest"))
        .current_dir(&f.mnt)
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&f.mnt)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or("no summary")
        .to_string();
    assert!(
        out.status.success() && summary.contains(" 0 failed"),
        "pjdfstest: {summary}\n{text}"
    );
    let skipped: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_end().ends_with("skipped"))
        .collect();
    for s in &skipped {
        let name = s.split_whitespace().next().unwrap_or("");
        assert!(
            name.contains("erofs") || name.contains("exdev") || name == "link::link_count_max",
            "unexpected skip: {s}"
        );
    }
    eprintln!("pjdfstest through drfs: {summary}");
    f.unmount();
}
