//! Page-aligned write payloads for O_DIRECT without a copy. fuser receives each request
//! into a 16 MiB + 4 KiB buffer; a WRITE's payload starts 80 bytes in (a 40-byte
//! `fuse_in_header` and a 40-byte `fuse_write_in`). This global allocator places exactly
//! that buffer 80 bytes before a page boundary, so every payload is page-aligned and can be
//! written to an O_DIRECT descriptor as it is. Every other allocation goes to the system
//! allocator untouched. The write path checks the alignment at run time and falls back to
//! a bounce copy, so a change in fuser costs speed, never correctness.

use std::alloc::{GlobalAlloc, Layout, System};

/// fuser's receive buffer: `MAX_WRITE_SIZE + 4096` (fuser 0.18 `read_buf.rs`).
const FUSE_BUF: usize = 16 * 1024 * 1024 + 4096;
/// Where the payload of a WRITE starts in that buffer.
pub const PAYLOAD_AT: usize = 80;
const PAGE: usize = 4096;
const SHIFT: usize = PAGE - PAYLOAD_AT;

pub struct FuseBufAlloc;

fn special(l: &Layout) -> bool {
    l.size() == FUSE_BUF && l.align() <= 16
}

/// The mapping behind a special buffer: anonymous, so it is zeroed and only the pages a
/// request touches become resident (16 threads do not cost 16 x 16 MiB).
const MAP_LEN: usize = FUSE_BUF + SHIFT;

fn map() -> *mut u8 {
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MAP_LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        unsafe { p.cast::<u8>().add(SHIFT) }
    }
}

unsafe impl GlobalAlloc for FuseBufAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if special(&l) {
            map()
        } else {
            unsafe { System.alloc(l) }
        }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if special(&l) {
            map()
        } else {
            unsafe { System.alloc_zeroed(l) }
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if special(&l) {
            unsafe { libc::munmap(p.sub(SHIFT).cast(), MAP_LEN) };
        } else {
            unsafe { System.dealloc(p, l) }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { Layout::from_size_align_unchecked(new_size, l.align()) };
        if !special(&l) && !special(&new) {
            return unsafe { System.realloc(p, l, new_size) };
        }
        let q = unsafe { self.alloc(new) };
        if !q.is_null() {
            unsafe {
                std::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                self.dealloc(p, l);
            }
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuse_buffer_payload_is_page_aligned() {
        let v = vec![0u8; FUSE_BUF];
        assert_eq!((v.as_ptr() as usize + PAYLOAD_AT) % PAGE, 0);
        let w = vec![0u8; 1000];
        assert!(!w.is_empty());
    }
}
