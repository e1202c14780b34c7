//! Per-thread page-aligned buffers for O_DIRECT I/O: FUSE hands payloads at odd addresses,
//! and O_DIRECT needs memory aligned to the device's alignment (4 KiB covers every disk
//! here). Two per thread: the bounce buffer a reply is built in, and a scratch buffer for
//! work done while the first holds that reply (a point reader's whole-block check).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::cell::RefCell;

/// A growable, page-aligned buffer.
struct Aligned {
    ptr: *mut u8,
    cap: usize,
}

const ALIGN: usize = 4096;

impl Aligned {
    fn get(&mut self, len: usize) -> &mut [u8] {
        if len > self.cap {
            self.release();
            let cap = len.next_multiple_of(ALIGN).max(ALIGN);
            let Ok(layout) = Layout::from_size_align(cap, ALIGN) else {
                return &mut [];
            };
            let ptr = unsafe { alloc_zeroed(layout) };
            if ptr.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            self.ptr = ptr;
            self.cap = cap;
        }
        if len == 0 {
            return &mut [];
        }
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    fn release(&mut self) {
        if !self.ptr.is_null() {
            if let Ok(layout) = Layout::from_size_align(self.cap, ALIGN) {
                unsafe { dealloc(self.ptr, layout) };
            }
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        self.release();
    }
}

thread_local! {
    static BOUNCE: RefCell<Aligned> = const { RefCell::new(Aligned { ptr: std::ptr::null_mut(), cap: 0 }) };
    static SCRATCH: RefCell<Aligned> = const { RefCell::new(Aligned { ptr: std::ptr::null_mut(), cap: 0 }) };
}

/// Runs `f` on this thread's page-aligned buffer of `len` bytes (contents undefined).
pub fn with_aligned<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE.with(|b| f(b.borrow_mut().get(len)))
}

/// A second such buffer, for work done while the first holds a reply (a point reader
/// reads a whole block into it to check its BLAKE3 when a read covers only part of it).
pub fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|b| f(b.borrow_mut().get(len)))
}
