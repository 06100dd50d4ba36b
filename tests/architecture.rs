//! The layering of `src/`, checked: no import cycle among its modules, and imports only point
//! down — domain ← wire formats ← use cases ← adapters (README "Architecture",
//! docs/architecture.md). A module added to `src/` must be given a layer here.
//!
//! Imports are read from the source text: every `crate::<module>` outside comments and test
//! modules, and, inside a directory, every `super::<sibling>` between its files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Plain values and rules: no I/O, no tonic, no RocksDB, no tokio, no wire formats.
const DOMAIN: &[&str] = &[
    "clock",
    "drift",
    "experiment",
    "feature_store",
    "ids",
    "outcome",
    "record",
    "registry",
    "routing",
    "shadow",
    "spec",
    "state",
    "stats",
    "tensor",
];
/// Generated protobuf code, the conversions between it and domain values, and the protobuf wire
/// format read unparsed.
const WIRE: &[&str] = &["pb", "convert", "wire"];
/// The use cases and the storage seam they work through.
const APP: &[&str] = &["app", "events", "monitor", "storage"];
/// Everything that talks to the outside: tonic services, RocksDB, the data plane and its
/// protocols, the state file, ctl, configuration, telemetry, the binary's commands.
const ADAPTERS: &[&str] = &[
    "admin",
    "config",
    "control",
    "ctl",
    "declare",
    "demo",
    "fleet",
    "fuzzing",
    "model_server",
    "oip",
    "protocol",
    "proxy",
    "recorder",
    "server",
    "startup_pages",
    "store",
    "telemetry",
    "tls",
    "traces",
    "webhook",
];

fn layer(module: &str) -> Option<(usize, &'static str)> {
    [
        (DOMAIN, "domain"),
        (WIRE, "wire"),
        (APP, "use cases"),
        (ADAPTERS, "adapters"),
    ]
    .iter()
    .enumerate()
    .find(|(_, (names, _))| names.contains(&module))
    .map(|(i, (_, name))| (i, *name))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source a module is built from, without its tests and comments.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Names following `prefix` in `code`.
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    code.match_indices(prefix)
        .filter(|(i, _)| {
            // Not the tail of a longer path (`foo::crate::` cannot occur; `super::super::` can).
            *i == 0 || !code.as_bytes()[i - 1].is_ascii_alphanumeric()
        })
        .map(|(i, _)| {
            code[i + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|n| !n.is_empty())
        .collect()
}

/// Strongly connected components with more than one node (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.g.contains_key(w) {
                continue;
            }
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g: graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn modules_form_layers_without_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // Top-level modules, and the files of each directory.
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut dirs: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let parts: Vec<String> = rel
            .with_extension("")
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        if parts.len() == 1 && (parts[0] == "lib" || parts[0] == "main") {
            continue;
        }
        let module = parts[0].clone();
        let code = code(f);
        let uses = names_after(&code, "crate::");
        top.entry(module.clone())
            .or_default()
            .extend(uses.into_iter().filter(|u| *u != module));
        if parts.len() == 2 && parts[1] != "mod" {
            let siblings = names_after(&code, "super::");
            dirs.entry(module)
                .or_default()
                .entry(parts[1].clone())
                .or_default()
                .extend(siblings);
        }
    }
    let mut problems = Vec::new();
    for c in cycles(&top) {
        problems.push(format!(
            "import cycle among src/ modules: {}",
            c.join(" → ")
        ));
    }
    for (dir, files) in &dirs {
        for c in cycles(files) {
            problems.push(format!(
                "import cycle among src/{dir}/ files: {}",
                c.join(" → ")
            ));
        }
    }
    let mut report = String::new();
    for (module, uses) in &top {
        let Some((level, name)) = layer(module) else {
            problems.push(format!(
                "src/{module} has no layer: add it to tests/architecture.rs"
            ));
            continue;
        };
        let uses: Vec<&String> = uses.iter().filter(|u| top.contains_key(*u)).collect();
        for u in &uses {
            if let Some((l, n)) = layer(u) {
                if l > level {
                    problems.push(format!(
                        "{module} ({name}) imports {u} ({n}): imports must point down"
                    ));
                }
            }
        }
        report.push_str(&format!(
            "{name:>9}  {module:<14} → {}\n",
            uses.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    println!("{report}");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
