//! The operator's side (issue 17): the event history, the metrics a real Prometheus
//! scrapes, verify. Each test drives a real mounted store and its replica.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

fn random_file(p: &Path, mib: u64) {
    sh(&format!("head -c {}M /dev/urandom > {}", mib, p.display()));
}

fn json(out: std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// The (kind, old, new) of each event of `path`, oldest first.
fn events(path: &Path) -> Vec<serde_json::Value> {
    json(ok(drfs().arg("events").arg(path).arg("--json")))
        .as_array()
        .expect("an array of events")
        .clone()
}

/// Whether `want` occurs in `got` in order (not necessarily next to each other).
fn in_order(got: &[String], want: &[&str]) -> bool {
    let mut it = got.iter();
    want.iter().all(|w| it.any(|g| g == w))
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_full_replica_turns_the_store_warning_and_back_and_the_events_say_so() {
    let f = Fixture::new("events");
    let img = f.root.join("small.img");
    let small = f.mountpoint("small");
    make_ext4(&img, 96 << 20, &["-m", "0"]);
    ok(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&small));
    let replica = small.join("replica");
    fs::create_dir(&replica).unwrap();
    random_file(&small.join("filler"), 60);
    f.mount(&[]);
    ok(drfs()
        .arg("protect")
        .arg(&f.store)
        .arg("--to")
        .arg(&replica)
        .args(["--interval", "manual"]));
    random_file(&f.m("small.img"), 1);
    ok(drfs().arg("ship").arg(&f.store));
    let st = json(ok(drfs().arg("status").arg(&f.store).arg("--json")));
    assert_eq!(st["health"], "normal", "{st:#}");

    // The replica's disk is full: the cycle fails, the store turns Warning.
    random_file(&f.m("disk.img"), 40);
    let out = drfs().arg("ship").arg(&f.store).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let st = json(ok(drfs().arg("status").arg(&f.store).arg("--json")));
    assert_eq!(st["health"], "warning", "{st:#}");

    // Space comes back: the next cycle ships. One of three cycles in the hour failed
    // (over 20 %): still Warning, until two more succeed.
    fs::remove_file(small.join("filler")).unwrap();
    ok(drfs().arg("ship").arg(&f.store));
    let st = json(ok(drfs().arg("status").arg(&f.store).arg("--json")));
    assert_eq!(st["health"], "warning", "{st:#}");
    assert_eq!(st["last_error"], serde_json::Value::Null, "{st:#}");
    for _ in 0..2 {
        random_file(&f.m("small.img"), 1);
        ok(drfs().arg("ship").arg(&f.store));
    }
    let st = json(ok(drfs().arg("status").arg(&f.store).arg("--json")));
    assert_eq!(st["health"], "normal", "{st:#}");

    let ev = events(&f.store);
    let health: Vec<String> = ev
        .iter()
        .filter(|e| e["kind"] == "health")
        .map(|e| e["new"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        in_order(&health, &["normal", "warning", "normal"]),
        "health events {health:?} in {ev:#?}"
    );
    let warning = ev
        .iter()
        .rfind(|e| e["kind"] == "health" && e["new"] == "warning")
        .unwrap();
    assert_eq!(warning["old"], "normal", "{warning:#}");
    assert!(
        warning["reason"]
            .as_str()
            .unwrap()
            .contains("last cycle failed"),
        "{warning:#}"
    );
    assert_eq!(warning["store"], f.store.display().to_string());
    let cycles: Vec<String> = ev
        .iter()
        .filter(|e| e["kind"] == "cycle")
        .map(|e| e["new"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(cycles, vec!["failed", "ok"], "{ev:#?}");
    let failed = ev.iter().find(|e| e["kind"] == "cycle").unwrap();
    assert!(
        failed["reason"].as_str().unwrap().contains("space"),
        "{failed:#}"
    );
    assert!(
        ev.iter()
            .any(|e| e["kind"] == "resync" && e["new"] == "done"),
        "the initial replication's end is an event: {ev:#?}"
    );
    // Times are in order; --since leaves out what came before.
    let times: Vec<i64> = ev.iter().map(|e| e["time_ns"].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let since = warning["time"].as_str().unwrap();
    let later = json(ok(drfs()
        .arg("events")
        .arg(&f.mnt)
        .args(["--since", since, "--json"])));
    let later = later.as_array().unwrap();
    assert!(later.len() < ev.len() && !later.is_empty(), "{later:#?}");
    // `time` has millisecond precision.
    let from = warning["time_ns"].as_i64().unwrap() / 1_000_000 * 1_000_000;
    assert!(later.iter().all(|e| e["time_ns"].as_i64().unwrap() >= from));
    assert!(later.iter().any(|e| e == warning), "{later:#?}");
    // The text form says the same, one line each.
    let text = String::from_utf8(ok(drfs().arg("events").arg(&f.store)).stdout).unwrap();
    assert_eq!(text.lines().count(), ev.len(), "{text}");
    assert!(text.contains("normal -> warning"), "{text}");
    f.unmount();
}

#[test]
fn events_of_something_that_is_no_store_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = drfs().arg("events").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    fails(out, "is not a drfs store");
    let out = drfs()
        .arg("events")
        .arg(dir.path())
        .args(["--since", "yesterday-ish"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// A free TCP port on 127.0.0.1 (bound and released: good enough for a test).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET http://127.0.0.1:port/path: (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of one sample in Prometheus text (`name{labels} value`), by name and a
/// label substring.
fn sample(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A Prometheus server the test started, killed (by pid) when dropped.
struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn a_real_prometheus_scrapes_the_daemon() {
    let prom_bin = need("prometheus");
    let promtool = need("promtool");
    let f = Fixture::new("metrics");
    let replica = f.root.join("replica");
    fs::create_dir(&replica).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    f.mount(&["--metrics-listen", &addr]);
    random_file(&f.m("vm.img"), 4);
    ok(drfs()
        .arg("protect")
        .arg(&f.store)
        .arg("--to")
        .arg(&replica)
        .args(["--interval", "2s"]));

    // Prometheus on 127.0.0.1, scraping the daemon every second.
    let pport = free_port();
    let pdir = f.root.join("prometheus");
    fs::create_dir(&pdir).unwrap();
    let cfg = pdir.join("prometheus.yml");
    fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: drfs\n    static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    let log = fs::File::create(pdir.join("log")).unwrap();
    let _prom = Prometheus(
        Command::new(&prom_bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                pdir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{pport}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting prometheus"),
    );
    let query = |q: &str| -> serde_json::Value {
        let (_, body) = http_get(pport, &format!("/api/v1/query?query={}", urlencode(q)));
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
    };
    let value = |v: &serde_json::Value| -> Option<f64> {
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let start = std::time::Instant::now();
    let mut cycles = None;
    while start.elapsed() < std::time::Duration::from_secs(90) {
        let up = std::net::TcpStream::connect(("127.0.0.1", pport)).is_ok();
        if up {
            cycles = value(&query("drfs_cycles_total"));
            if cycles.is_some_and(|c| c >= 3.0) {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let cycles = cycles.unwrap_or_else(|| {
        panic!(
            "Prometheus never got drfs_cycles_total; its log: {}",
            fs::read_to_string(pdir.join("log")).unwrap_or_default()
        )
    });
    assert!(cycles >= 3.0, "cycles {cycles}");
    let r = query("drfs_cycles_total");
    assert_eq!(
        r["data"]["result"][0]["metric"]["store"],
        f.store.display().to_string(),
        "{r:#}"
    );
    let lag = value(&query("drfs_rpo_lag_seconds")).expect("RPO lag scraped");
    assert!((0.0..60.0).contains(&lag), "lag {lag}");
    let lag2 = value(&query("time() - drfs_last_point_timestamp_seconds")).expect("point time");
    assert!((0.0..60.0).contains(&lag2), "lag {lag2}");
    assert_eq!(value(&query("drfs_health")), Some(0.0));
    assert_eq!(
        value(&query("drfs_health_state{state=\"normal\"}")),
        Some(1.0)
    );
    assert!(value(&query("drfs_replica_points")).is_some_and(|p| p >= 1.0));
    assert_eq!(value(&query("up{job=\"drfs\"}")), Some(1.0));

    // Paused, the figures stand still: status --json and /metrics agree.
    ok(drfs().arg("pause").arg(&f.store));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let st = json(ok(drfs().arg("status").arg(&f.store).arg("--json")));
    let (line, text) = http_get(port, "/metrics");
    assert!(line.contains("200"), "{line}");
    let store = format!("store=\"{}\"", f.store.display());
    assert_eq!(
        sample(&text, "drfs_cycles_total", &store),
        st["totals"]["cycles"].as_f64(),
        "{text}\n{st:#}"
    );
    assert_eq!(
        sample(&text, "drfs_cycle_failures_total", &store),
        st["totals"]["failed"].as_f64()
    );
    assert_eq!(
        sample(&text, "drfs_sent_bytes_total", &store),
        st["totals"]["bytes"].as_f64()
    );
    assert_eq!(
        sample(&text, "drfs_pending_bytes", &store),
        st["pending_bytes"].as_f64()
    );
    let pt = sample(&text, "drfs_last_point_timestamp_seconds", &store).unwrap();
    let want = st["last_point_time_ns"].as_f64().unwrap() / 1e9;
    assert!((pt - want).abs() < 1e-3, "{pt} vs {want}");
    assert_eq!(
        sample(&text, "drfs_last_cycle_duration_seconds", &store),
        st["last_cycle"]["duration_ms"].as_f64().map(|m| m / 1e3)
    );
    assert_eq!(sample(&text, "drfs_paused", &store), Some(1.0));

    // `drfs metrics` prints the same families; promtool accepts it.
    for path in [&f.store, &replica] {
        let out = ok(drfs().arg("metrics").arg(path));
        let mut child = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(&out.stdout).unwrap();
        }
        let res = child.wait_with_output().unwrap();
        assert!(
            res.status.success() && res.stdout.is_empty() && res.stderr.is_empty(),
            "promtool check metrics on drfs metrics {}: {}{}\n{}",
            path.display(),
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let printed = String::from_utf8(ok(drfs().arg("metrics").arg(&f.store)).stdout).unwrap();
    assert_eq!(
        sample(&printed, "drfs_cycles_total", &store),
        st["totals"]["cycles"].as_f64()
    );
    assert!(http_get(port, "/nothing").0.contains("404"));

    // A second daemon on the same port: one line, non-zero, nothing mounted.
    let other = Fixture::new("metrics-busy");
    let out = drfs()
        .arg("mount")
        .arg(&other.store)
        .arg(&other.mnt)
        .args(["--metrics-listen", &addr])
        .output()
        .unwrap();
    fails(out, "in use");
    assert!(!is_mounted(&other.mnt));
    let out = drfs()
        .arg("mount")
        .arg(&other.store)
        .arg(&other.mnt)
        .args(["--metrics-listen", "nonsense"])
        .output()
        .unwrap();
    fails(out, "--metrics-listen");
    assert!(!is_mounted(&other.mnt));
    f.unmount();
}

fn verify(replica: &Path, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let out = drfs()
        .arg("verify")
        .arg(replica)
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let code = out.status.code();
    let v =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("verify --json: {out:?}"));
    (code, v)
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn verify_finds_a_flipped_byte_in_an_undo_record_and_in_a_latest_file() {
    let r = common::rep::Rep::new("verify", "manual", "all:1h");
    random_file(&r.f.m("a.img"), 4);
    random_file(&r.f.m("b.img"), 1);
    ok(drfs().arg("ship").arg(&r.f.store));
    let p1 = r.latest();
    sh(&format!(
        "head -c 1M /dev/urandom | dd of={} conv=notrunc status=none",
        r.f.m("a.img").display()
    ));
    ok(drfs().arg("ship").arg(&r.f.store));
    let p2 = r.latest();

    // Clean: every block of every point matches.
    let (code, v) = verify(&r.replica, &["--all"]);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["bad"].as_array().unwrap().len(), 0, "{v:#}");
    // 4 MiB + 1 MiB latest, 1 MiB in point 1's undo record, in 64 KiB blocks.
    assert_eq!(v["blocks"], 96, "{v:#}");
    let (code, v) = verify(&r.replica, &[]);
    assert_eq!((code, v["blocks"].as_u64()), (Some(0), Some(80)), "{v:#}");

    // One byte of point 1's undo record, one of the latest a.img (a block no record holds).
    let undo = r.replica.join(format!(".drfs/points/{p1}/undo"));
    let data = fs::read_dir(&undo)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "data"))
        .expect("an undo data file");
    flip(&data, 65536 + 100);
    flip(&r.replica.join("a.img"), (3 << 20) + 5);
    let (code, v) = verify(&r.replica, &["--all"]);
    assert_eq!(code, Some(2), "{v:#}");
    let bad = v["bad"].as_array().unwrap();
    assert_eq!(bad.len(), 2, "{v:#}");
    let latest = bad.iter().find(|b| b["source"] == "latest file").unwrap();
    assert_eq!(latest["file"], "a.img");
    assert_eq!(latest["offset"], 3 << 20);
    assert_eq!(latest["points"], serde_json::json!([p1, p2]), "{latest:#}");
    let rec = bad
        .iter()
        .find(|b| b["source"] == format!("undo record of point {p1}"))
        .unwrap();
    assert_eq!(rec["file"], "a.img");
    assert_eq!(rec["offset"], 65536);
    assert_eq!(rec["points"], serde_json::json!([p1]), "{rec:#}");
    // The latest point alone reads only the latest file's bad block.
    let (code, v) = verify(&r.replica, &["--point", &p2]);
    assert_eq!(
        (code, v["bad"].as_array().unwrap().len()),
        (Some(2), 1),
        "{v:#}"
    );

    // The replica is Warning, and the findings are events.
    let st = json(ok(drfs().arg("status").arg(&r.replica).arg("--json")));
    assert_eq!(st["health"], "warning", "{st:#}");
    assert_eq!(st["verify_bad_blocks"], 1, "{st:#}");
    let ev = events(&r.replica);
    let found: Vec<&serde_json::Value> = ev
        .iter()
        .filter(|e| e["kind"] == "verify" && e["new"] == "bad" && e["file"] == "a.img")
        .collect();
    assert!(found.len() >= 3, "{ev:#?}");
    assert!(
        found
            .iter()
            .any(|e| e["reason"].as_str().unwrap().contains("offset 3145728")),
        "{found:#?}"
    );
    assert!(
        ev.iter()
            .any(|e| e["kind"] == "health" && e["new"] == "warning"),
        "{ev:#?}"
    );

    // Resumable: killed after its first file, the next run carries on and counts it all.
    let out = drfs()
        .arg("verify")
        .arg(&r.replica)
        .args(["--all", "--restart"])
        .env("DRFS_FAULT", "verify:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), None, "killed: {out:?}");
    let (code, v) = verify(&r.replica, &["--all"]);
    assert_eq!(code, Some(2), "{v:#}");
    assert_eq!(v["resumed"], true, "{v:#}");
    assert_eq!(v["blocks"], 96, "{v:#}");
    assert!(v["run_bytes"].as_u64().unwrap() < 6 << 20, "{v:#}");
    assert_eq!(v["bad"].as_array().unwrap().len(), 2, "{v:#}");

    // A bounded rate: 2 MiB/s over 6 MiB.
    let rate = 2u64 << 20;
    let (_, v) = verify(&r.replica, &["--all", "--restart", "--rate", "2M"]);
    let got = v["run_bytes"].as_f64().unwrap() / v["run_seconds"].as_f64().unwrap();
    eprintln!(
        "verify --rate 2M: {:.2} MiB/s over {} bytes in {:.2} s",
        got / (1 << 20) as f64,
        v["run_bytes"],
        v["run_seconds"]
    );
    assert!(got <= rate as f64 * 1.2, "rate {got} over 2M");
    assert!(got >= rate as f64 * 0.3, "rate {got} far under 2M");

    // The store is no replica: one line, usage.
    let out = drfs().arg("verify").arg(&r.f.store).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    fails(out, "is not a drfs replica");
    r.f.unmount();
}

/// Headless Chromium on `url`: what `--dump-dom` printed, and a screenshot at `png`.
fn chromium(url: &str, profile: &Path, png: &Path) -> String {
    let bin = need("chromium");
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
    ];
    let dom = ok(Command::new("timeout")
        .arg("120")
        .arg(&bin)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(url));
    ok(Command::new("timeout")
        .arg("120")
        .arg(&bin)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--window-size=1024,1400")
        .arg(format!("--screenshot={}", png.display()))
        .arg(url));
    String::from_utf8_lossy(&dom.stdout).into_owned()
}

/// The text inside the element with `id` in a dumped DOM.
fn by_id(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in {dom}"));
    let start = at + dom[at..].find('>').unwrap() + 1;
    let end = start + dom[start..].find('<').unwrap();
    dom[start..end].to_string()
}

#[test]
#[cfg_attr(not(drfs_root), ignore = "mounts FUSE filesystems: run as root")]
fn the_status_page_shows_in_a_real_browser() {
    let f = Fixture::new("page");
    let replica = f.root.join("replica");
    fs::create_dir(&replica).unwrap();
    let port = free_port();
    f.mount(&["--metrics-listen", &format!("127.0.0.1:{port}")]);
    ok(drfs()
        .arg("protect")
        .arg(&f.store)
        .arg("--to")
        .arg(&replica)
        .args(["--interval", "manual"]));
    random_file(&f.m("vm1.img"), 2);
    ok(drfs().arg("ship").arg(&f.store));
    random_file(&f.m("vm1.img"), 1);
    ok(drfs().arg("ship").arg(&f.store));
    let st = json(ok(drfs().arg("status").arg(&f.store).arg("--json")));
    let newest = st["last_point"].as_str().unwrap().to_string();

    // What the daemon serves loads nothing: no script, no link, no image, no style sheet.
    let (line, html) = http_get(port, "/");
    assert!(line.contains("200"), "{line}");
    for outside in ["<script", "src=", "href=", "@import", "url("] {
        assert!(!html.contains(outside), "the page has {outside}: {html}");
    }
    let png = f.root.join("page.png");
    let dom = chromium(
        &format!("http://127.0.0.1:{port}/"),
        &f.root.join("chromium"),
        &png,
    );
    assert_eq!(by_id(&dom, "store"), f.store.display().to_string());
    assert_eq!(by_id(&dom, "health"), "normal");
    assert_eq!(by_id(&dom, "role"), "primary");
    assert!(by_id(&dom, "newest-point").starts_with(&newest), "{dom}");
    assert_eq!(by_id(&dom, "replica").trim(), replica.display().to_string());
    assert_eq!(by_id(&dom, "replica-points"), "2");
    assert!(dom.contains("id=\"rpo-chart\""), "{dom}");
    assert!(dom.contains("<polyline"), "{dom}");
    assert!(dom.contains("http-equiv=\"refresh\""), "{dom}");
    // The recent events and the points timeline.
    assert!(
        dom.contains("id=\"events\"") && dom.contains(">health<"),
        "{dom}"
    );
    assert!(dom.contains(&format!("<td>{newest}</td>")), "{dom}");
    let shot = fs::read(&png).expect("a screenshot");
    assert!(
        shot.len() > 1000 && shot.starts_with(b"\x89PNG"),
        "not a PNG"
    );
    f.unmount();
}
