//! The tracked passthrough: the FUSE filesystem over the store (`fs`), its inodes
//! (`inode`), open files (`handle`), and the caller's credentials (`creds`).

pub mod creds;
pub mod fs;
pub mod handle;
pub mod inode;
