//! Mounting a FUSE session so that its end unmounts only its own mount.
//!
//! fuser 0.18 unmounts by path when a session ends, behind an inverted liveness check:
//! after an unmount it unmounts whatever is mounted at that path by then — a new browse,
//! clone or store mount started there a moment later. So drfs mounts with mount(2)
//! itself, hands the descriptor to fuser, keeps a second descriptor of the connection,
//! and at the end detaches the mountpoint only while that connection still lives (then
//! the mount there is its own: a live superblock keeps its device number). Without the
//! right to mount (not root), fuser mounts through fusermount3 as before.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use fuser::{Filesystem, MountOption, SessionACL};

use crate::fuse::mountinfo;
use crate::sys;

/// A mounted session, ready to serve.
pub struct Attached<FS: Filesystem> {
    session: fuser::Session<FS>,
    /// Ours: a second descriptor of the connection and the mount's device ("major:minor").
    own: Option<(OwnedFd, String)>,
    mnt: PathBuf,
}

/// Mounts `fs` at `mnt` with the options in `cfg` and does the FUSE handshake.
pub fn attach<FS: Filesystem>(fs: FS, mnt: &Path, cfg: &fuser::Config) -> io::Result<Attached<FS>> {
    // As the mount table will list it.
    let mnt = &mnt.canonicalize()?;
    let dev = File::options().read(true).write(true).open("/dev/fuse")?;
    match mount(&dev, mnt, cfg) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let session = fuser::Session::new(fs, mnt, cfg)?;
            return Ok(Attached {
                session,
                own: None,
                mnt: mnt.to_path_buf(),
            });
        }
        r => r?,
    }
    // From the mount table: a stat of `mnt` would ask this very filesystem, not served yet.
    let ours = mountinfo::at(mnt).map(|e| e.dev);
    let conn = dev.try_clone();
    let session = fuser::Session::from_fd(fs, dev.into(), cfg.acl, cfg.clone());
    match (session, conn, ours) {
        (Ok(session), Ok(conn), Some(ours)) => Ok(Attached {
            session,
            own: Some((conn.into(), ours)),
            mnt: mnt.to_path_buf(),
        }),
        (s, c, _) => {
            // Just mounted and not served: ours to take down.
            let _ = crate::fuse::daemon::detach(mnt);
            Err(s
                .err()
                .or(c.err())
                .unwrap_or_else(|| io::Error::other("the new mount is not in the mount table")))
        }
    }
}

impl<FS: Filesystem> Attached<FS> {
    /// Serves until unmounted; then makes sure its own mount is gone, and no other.
    pub fn run(self) -> io::Result<()> {
        let Attached { session, own, mnt } = self;
        let r = session.run();
        if let Some((conn, dev)) = own {
            let ours = mountinfo::at(&mnt).is_some_and(|e| e.dev == dev);
            if alive(&conn) && ours {
                let _ = crate::fuse::daemon::detach(&mnt);
            }
        }
        r
    }
}

/// The mount(2) call fuser would make: source from FSName, nodev and nosuid, ro if asked.
fn mount(dev: &File, mnt: &Path, cfg: &fuser::Config) -> io::Result<()> {
    let mode = std::fs::metadata(mnt)?.mode();
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={}",
        dev.as_raw_fd(),
        mode,
        unsafe { libc::getuid() },
        unsafe { libc::getgid() }
    );
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    let mut source = "drfs".to_string();
    for o in &cfg.mount_options {
        match o {
            MountOption::FSName(s) => source = s.clone(),
            MountOption::Subtype(_) => {}
            MountOption::RO => flags |= libc::MS_RDONLY,
            MountOption::DefaultPermissions => data.push_str(",default_permissions"),
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("mount option {other:?} is not supported"),
                ));
            }
        }
    }
    match cfg.acl {
        SessionACL::All => data.push_str(",allow_other"),
        SessionACL::Owner => {}
        SessionACL::RootAndOwner => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "allow_root is not supported",
            ));
        }
    }
    let (src, target, data) = (
        sys::cstr(OsStr::new(&source))?,
        sys::cpath(mnt)?,
        sys::cstr(OsStr::new(&data))?,
    );
    sys::cvt(unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            c"fuse".as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    })
    .map(drop)
}

/// Whether the FUSE connection behind `conn` is still up (it reports POLLERR once
/// unmounted or aborted).
fn alive(conn: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 0 || (n == 1 && p.revents & libc::POLLERR == 0)
}
