//! The house rules, checked on the source: every module of `src/` belongs to a layer (the
//! table in `src/lib.rs`'s opening comment is the one place that says which), a module
//! imports only from its own layer and the ones below it, and no two modules import each
//! other, directly or around a loop (a module and the modules inside it excepted: a
//! parent declares its children, and children use their parent's types). Every
//! `crate::` path counts, in `use` lines and inline. Needs no root.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Layer by top-level module, from the table in lib.rs (`//! | N | `a`, `b` | ... |`).
fn layers() -> BTreeMap<String, u32> {
    let text = std::fs::read_to_string(src().join("lib.rs")).expect("lib.rs");
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.trim_start_matches("//!").split('|').collect();
        let (Some(n), Some(mods)) = (cells.get(1), cells.get(2)) else {
            continue;
        };
        let Ok(n) = n.trim().parse::<u32>() else {
            continue;
        };
        for m in mods.split(',') {
            out.insert(m.trim().trim_matches('`').to_string(), n);
        }
    }
    out
}

/// Every source file as its module path (`replica::posix::hashes`) and its text.
fn modules() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("src dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src()).expect("under src");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            if parts.last().is_some_and(|l| l == "mod") {
                parts.pop();
            }
            let name = parts.join("::");
            if name == "lib" || name == "main" {
                continue;
            }
            out.insert(name, std::fs::read_to_string(&p).expect("source"));
        }
    }
    out
}

/// The modules a file's `crate::` paths name (the longest prefix that is a module).
fn imports(text: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    // `use crate::a::{b, c::d}` names a::b and a::c::d; inline paths name themselves.
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let path: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let mut prefixes = vec![path.trim_end_matches(':').to_string()];
        if path.ends_with("::") && rest[path.len()..].starts_with('{') {
            let body: String = rest[path.len() + 1..]
                .chars()
                .take_while(|c| *c != '}')
                .collect();
            for item in body.split(',') {
                let item = item.split_whitespace().next().unwrap_or("");
                if !item.is_empty() && item != "self" {
                    prefixes.push(format!("{path}{item}"));
                }
            }
        }
        for p in prefixes {
            let segs: Vec<&str> = p.split("::").collect();
            if let Some(m) = (1..=segs.len())
                .rev()
                .map(|n| segs[..n].join("::"))
                .find(|m| known.contains(m))
            {
                out.insert(m);
            }
        }
    }
    out
}

fn top(m: &str) -> &str {
    m.split("::").next().unwrap_or(m)
}

fn related(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"))
}

#[test]
fn every_module_imports_only_its_own_layer_and_below() {
    let layers = layers();
    let mods = modules();
    let known: BTreeSet<String> = mods.keys().cloned().collect();
    let mut bad = Vec::new();
    for (m, text) in &mods {
        let Some(&mine) = layers.get(top(m)) else {
            bad.push(format!("{m}: its top-level module has no layer in lib.rs"));
            continue;
        };
        for dep in imports(text, &known) {
            let theirs = layers.get(top(&dep)).copied().unwrap_or(u32::MAX);
            if theirs > mine {
                bad.push(format!("{m} (layer {mine}) imports {dep} (layer {theirs})"));
            }
        }
    }
    assert!(bad.is_empty(), "upward imports:\n{}", bad.join("\n"));
}

#[test]
fn no_two_modules_import_each_other() {
    let mods = modules();
    let known: BTreeSet<String> = mods.keys().cloned().collect();
    let graph: BTreeMap<String, BTreeSet<String>> = mods
        .iter()
        .map(|(m, text)| {
            let deps = imports(text, &known)
                .into_iter()
                .filter(|d| !related(m, d))
                .collect();
            (m.clone(), deps)
        })
        .collect();
    // Depth-first search for a back edge; report the loop it closes.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        loops: &mut Vec<String>,
    ) {
        if let Some(i) = path.iter().position(|p| p == m) {
            loops.push(format!("{} -> {m}", path[i..].join(" -> ")));
            return;
        }
        if !done.insert(m.to_string()) {
            return;
        }
        path.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            visit(d, graph, path, done, loops);
        }
        path.pop();
    }
    let mut loops = Vec::new();
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done, &mut loops);
    }
    assert!(loops.is_empty(), "import cycles:\n{}", loops.join("\n"));
}

#[test]
fn the_checker_sees_grouped_and_inline_imports() {
    let known: BTreeSet<String> = ["a", "a::b", "c", "d::e"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let text = "use crate::a::{b::X, Y};\nfn f() { crate::c::go(); crate::d::e::Z; }";
    let got: Vec<String> = imports(text, &known).into_iter().collect();
    assert_eq!(got, ["a", "a::b", "c", "d::e"]);
}
