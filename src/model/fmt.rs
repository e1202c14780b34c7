//! How drfs writes quantities for people and files: byte counts (`human`), counted nouns
//! (`plural`), and times as RFC 3339 in UTC.

/// A byte count with a binary unit: `512 B`, `64.0 KiB`, `1.5 GiB`.
pub fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// `1 file`, `3 files`.
pub fn plural(n: u64, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {one}s")
    }
}

/// Now, to the second.
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// A time in ns since the epoch, to the millisecond.
pub fn rfc3339_ns(ns: i128) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// "12.0 MiB sent" or, compressed, "12.0 MiB sent (4.1 MiB on the wire, 2.93x)".
pub fn sent(bytes: u64, wire: u64) -> String {
    if wire == 0 || wire == bytes {
        return format!("{} sent", human(bytes));
    }
    format!(
        "{} sent ({} on the wire, {:.2}x)",
        human(bytes),
        human(wire),
        bytes as f64 / wire as f64
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_read_well() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(65536), "64.0 KiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(plural(1, "file"), "1 file");
        assert_eq!(plural(0, "file"), "0 files");
        assert_eq!(rfc3339_ns(1_500_000_000), "1970-01-01T00:00:01.500Z");
    }
}
