//! Acting as the caller: for namespace and attribute operations the serving thread takes
//! the requester's fsuid, fsgid and supplementary groups (per-thread raw syscalls, as
//! virtiofsd does), so the store's own filesystem applies every permission rule (sticky
//! directories, setgid inheritance, chown limits) exactly as it would natively.

use std::sync::OnceLock;

use fuser::Request;

/// The daemon's own supplementary groups, restored after each impersonation.
fn own_groups() -> &'static Vec<libc::gid_t> {
    static G: OnceLock<Vec<libc::gid_t>> = OnceLock::new();
    G.get_or_init(|| {
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        let mut v = vec![0; n.max(0) as usize];
        let n = unsafe { libc::getgroups(v.len() as i32, v.as_mut_ptr()) };
        v.truncate(n.max(0) as usize);
        v
    })
}

/// Supplementary groups of process `pid`, from /proc (empty if it is gone).
fn groups_of(pid: u32) -> Vec<libc::gid_t> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn set_groups(g: &[libc::gid_t]) {
    unsafe { libc::syscall(libc::SYS_setgroups, g.len(), g.as_ptr()) };
}

/// While alive, this thread's filesystem identity is the requester's.
pub struct AsCaller {
    active: bool,
}

impl AsCaller {
    pub fn new(req: &Request, enabled: bool) -> AsCaller {
        let (uid, gid) = (req.uid(), req.gid());
        if !enabled || (uid == 0 && gid == 0) {
            return AsCaller { active: false };
        }
        own_groups();
        set_groups(&groups_of(req.pid()));
        unsafe {
            libc::syscall(libc::SYS_setfsgid, gid);
            libc::syscall(libc::SYS_setfsuid, uid);
        }
        AsCaller { active: true }
    }
}

impl Drop for AsCaller {
    fn drop(&mut self) {
        if self.active {
            unsafe {
                libc::syscall(libc::SYS_setfsuid, 0);
                libc::syscall(libc::SYS_setfsgid, 0);
            }
            set_groups(own_groups());
        }
    }
}
