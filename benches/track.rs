//! What tracking costs a write, without the noise of a FUSE round trip: the tracker's
//! `begin_write` on a hot extent (the path every write takes once its 64 MiB extent is in
//! the activity log, its begin and end stamped) for a 4 KiB and a 1 MiB write, and the
//! bitmap's bit-set alone.
//! Run: cargo bench --bench track

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use drfs::model::RelPath;
use drfs::primary::track::Tracker;
use drfs::primary::track::bitmap::Bitmap;
use drfs::primary::track::run::{LastStop, RunStart};
use drfs::state::StateDir;

fn tracker(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    std::fs::create_dir(&store).expect("store");
    let (sd, cfg) = StateDir::open_or_init(&store, None).expect("state");
    let t = Tracker::open(sd, cfg, dir.path(), LastStop::Fresh, RunStart::now()).expect("tracker");
    let img = store.join("disk.img");
    std::fs::write(&img, b"").expect("image");
    let open = || std::fs::File::open(&img);
    let ft = t
        .created(RelPath::from_bytes(b"disk.img"), 12, 34, 0o644, &open)
        .expect("file");
    // Warm the extents once so the loop measures the steady state.
    drop(t.begin_write(&ft, 0, 1 << 30).expect("warm"));
    let mut off = 0u64;
    c.bench_function("begin_write 4KiB (hot extent)", |b| {
        b.iter(|| {
            off = (off + 4096 * 7919) % (1 << 30);
            drop(black_box(t.begin_write(&ft, off, 4096).expect("mark")));
        })
    });
    c.bench_function("begin_write 1MiB (hot extent)", |b| {
        b.iter(|| {
            off = (off + (1 << 20) * 13) % ((1 << 30) - (1 << 20));
            drop(black_box(t.begin_write(&ft, off, 1 << 20).expect("mark")));
        })
    });
    let bm = Bitmap::open(&dir.path().join("b.bm"), 65536, 1, 1 << 20).expect("bitmap");
    c.bench_function("bitmap set 1 block", |b| {
        b.iter(|| {
            off = (off + 7919) % (1 << 20);
            bm.set(black_box(off), black_box(off));
        })
    });
}

criterion_group!(benches, tracker);
criterion_main!(benches);
