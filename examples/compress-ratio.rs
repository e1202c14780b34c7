//! Per-block against per-stream zstd on a real image (issue 15): reads IMAGE's non-zero
//! blocks (zero blocks travel as holes, uncompressed) and prints, per level, the ratio and
//! the single-thread compression rate of one zstd stream over all of them against one
//! zstd frame per block, and the cost on incompressible (random) data.
//!
//! `cargo run --release --example compress-ratio IMAGE [BLOCK_SIZE]`

use std::io::{Read, Write};
use std::time::Instant;

struct Count(u64);
impl Write for Count {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn stream(blocks: &[Vec<u8>], level: i32) -> (u64, f64) {
    let t = Instant::now();
    let mut e = zstd::stream::write::Encoder::new(Count(0), level).unwrap();
    e.include_contentsize(false).unwrap();
    for b in blocks {
        e.write_all(b).unwrap();
    }
    let c = e.finish().unwrap();
    (c.0, t.elapsed().as_secs_f64())
}

fn per_block(blocks: &[Vec<u8>], level: i32) -> (u64, f64) {
    let t = Instant::now();
    let mut c = zstd::bulk::Compressor::new(level).unwrap();
    let mut n = 0u64;
    for b in blocks {
        // A block that does not shrink would travel plain: count the smaller.
        n += (c.compress(b).unwrap().len() as u64).min(b.len() as u64);
    }
    (n, t.elapsed().as_secs_f64())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .expect("usage: compress-ratio IMAGE [BLOCK_SIZE]");
    let bs: usize = args
        .get(2)
        .map_or(65536, |s| s.parse().expect("block size"));
    let mut f = std::fs::File::open(path).expect("image");
    let mut blocks = Vec::new();
    let mut zero = 0u64;
    loop {
        let mut b = vec![0u8; bs];
        let mut got = 0;
        while got < bs {
            match f.read(&mut b[got..]).expect("read") {
                0 => break,
                n => got += n,
            }
        }
        if got == 0 {
            break;
        }
        b.truncate(got);
        if b.iter().all(|&x| x == 0) {
            zero += 1;
        } else {
            blocks.push(b);
        }
    }
    let raw: u64 = blocks.iter().map(|b| b.len() as u64).sum();
    let mib = raw as f64 / (1 << 20) as f64;
    println!(
        "{path}: {} non-zero blocks of {bs} ({mib:.0} MiB), {zero} zero blocks skipped",
        blocks.len()
    );
    println!("| level | per-stream ratio | MiB/s | per-block ratio | MiB/s |");
    println!("|---|---|---|---|---|");
    for level in [1, 3, 6] {
        let (s, st) = stream(&blocks, level);
        let (b, bt) = per_block(&blocks, level);
        println!(
            "| {level} | {:.3} | {:.0} | {:.3} | {:.0} |",
            raw as f64 / s as f64,
            mib / st,
            raw as f64 / b as f64,
            mib / bt
        );
    }
    // Incompressible data: what a stream costs over sending it plain.
    let mut random = vec![0u8; 256 << 20];
    getrandom::fill(&mut random).expect("random");
    let chunks: Vec<Vec<u8>> = random.chunks(bs).map(|c| c.to_vec()).collect();
    for level in [1, 3] {
        let (s, st) = stream(&chunks, level);
        println!(
            "random 256 MiB, stream level {level}: {:.3}% larger, {:.0} MiB/s",
            (s as f64 / random.len() as f64 - 1.0) * 100.0,
            256.0 / st
        );
    }
}
