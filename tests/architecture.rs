//! The dependency rules of DESIGN.md and ARCHITECTURE.md, checked on the source: no import
//! cycle between top-level modules; the engine (codec, config, model, schema, sketch, window,
//! policy, controller, pipeline) imports only the engine and no Kafka, tokio, HTTP; the two
//! drivers (runtime, backtest) import neither each other nor demo. A change that breaks one
//! fails here, naming the module and the path that breaks it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const ENGINE: &[&str] = &[
    "codec",
    "config",
    "model",
    "schema",
    "sketch",
    "window",
    "policy",
    "controller",
    "pipeline",
];
const IO_CRATES: &[&str] = &["rdkafka", "tokio", "tiny_http", "ureq", "hyper", "reqwest"];

/// Source text without `//` comments (doc links would count as imports otherwise).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Top-level modules a file refers to: `crate::x` and `use crate::{x, y::z}`.
fn refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // Top-level names of a `{...}` group: the first segment of each item at depth 0.
            let (mut depth, mut item, mut first_seg) = (0, String::new(), true);
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        if is_ident(item.trim()) {
                            out.insert(item.trim().to_string());
                        }
                        item.clear();
                        first_seg = true;
                        continue;
                    }
                    ':' if depth == 0 => first_seg = false,
                    c if depth == 0 && first_seg => item.push(c),
                    _ => {}
                }
            }
            if is_ident(item.trim()) {
                out.insert(item.trim().to_string());
            }
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
        rest = after;
    }
    out
}

struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
    crates: BTreeMap<String, BTreeSet<&'static str>>,
}

/// Every `.rs` file under `src`.
fn rust_files(src: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    files
}

fn graph(src: &Path) -> Graph {
    let files = rust_files(src);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut crates: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = code(&std::fs::read_to_string(f).unwrap());
        let e = edges.entry(module.clone()).or_default();
        e.extend(refs(&text).into_iter().filter(|r| *r != module));
        for c in IO_CRATES {
            if text.contains(&format!("{c}::")) {
                crates.entry(module.clone()).or_default().insert(c);
            }
        }
    }
    let modules: BTreeSet<String> = edges.keys().cloned().collect();
    for e in edges.values_mut() {
        e.retain(|m| modules.contains(m));
    }
    Graph { edges, crates }
}

impl Graph {
    /// A path of imports from `a` to `b` (`a` to itself: a cycle), if any.
    fn path(&self, a: &str, b: &str) -> Option<Vec<String>> {
        let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
        let mut seen = BTreeSet::from([a]);
        let mut queue = std::collections::VecDeque::from([a]);
        while let Some(x) = queue.pop_front() {
            for y in self.edges.get(x).into_iter().flatten() {
                if y == b {
                    let mut path = vec![b.to_string(), x.to_string()];
                    let mut at = x;
                    while at != a {
                        at = prev[at];
                        path.push(at.to_string());
                    }
                    path.reverse();
                    return Some(path);
                }
                if seen.insert(y) {
                    prev.insert(y, x);
                    queue.push_back(y);
                }
            }
        }
        None
    }
}

fn src() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_module_imports_itself_through_others() {
    let g = graph(&src());
    let cycles: Vec<String> = g
        .edges
        .keys()
        .filter_map(|m| g.path(m, m).map(|p| p.join(" -> ")))
        .collect();
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}

#[test]
fn the_engine_imports_only_the_engine_and_no_io() {
    let g = graph(&src());
    let mut broken = Vec::new();
    for m in ENGINE {
        assert!(g.edges.contains_key(*m), "no engine module {m} in src/");
        for other in g.edges.keys().filter(|o| !ENGINE.contains(&o.as_str())) {
            if let Some(p) = g.path(m, other) {
                broken.push(format!(
                    "engine module {m} reaches {other}: {}",
                    p.join(" -> ")
                ));
            }
        }
        if let Some(c) = g.crates.get(*m) {
            broken.push(format!("engine module {m} uses {c:?}"));
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

#[test]
fn the_drivers_import_neither_each_other_nor_the_demo() {
    let g = graph(&src());
    let mut broken = Vec::new();
    for (a, b) in [
        ("runtime", "backtest"),
        ("backtest", "runtime"),
        ("runtime", "demo"),
        ("backtest", "demo"),
        ("actuator", "runtime"),
        ("demo", "cli"),
    ] {
        if let Some(p) = g.path(a, b) {
            broken.push(format!("{a} reaches {b}: {}", p.join(" -> ")));
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

#[test]
fn the_checker_sees_imports_and_cycles() {
    // The parser itself, on made-up sources: a test of the rules must be able to fail.
    let text =
        code("use crate::{a, b::{C, D}, e::f};\nfn x() { crate::g::h(); }\n// crate::comment\n");
    assert_eq!(
        refs(&text),
        ["a", "b", "e", "g"].iter().map(|s| s.to_string()).collect()
    );
    let g = Graph {
        edges: BTreeMap::from([
            ("x".to_string(), BTreeSet::from(["y".to_string()])),
            ("y".to_string(), BTreeSet::from(["x".to_string()])),
        ]),
        crates: BTreeMap::new(),
    };
    assert_eq!(g.path("x", "x").unwrap(), ["x", "y", "x"]);
    assert_eq!(g.path("x", "z"), None);
}

/// The library reads no process environment: settings come in through `Config` (whose loader
/// is handed the environment) and the options of each call. Only the binary's entry point and
/// the logging setup of the long-running subcommands (`process`: `RUST_LOG`, `NO_COLOR`) may.
#[test]
fn the_library_reads_no_process_environment() {
    let files = rust_files(&src());
    let allowed = ["main.rs", "process.rs"];
    let offenders: Vec<String> = files
        .iter()
        .filter(|p| !allowed.iter().any(|a| p.ends_with(a)))
        .filter(|p| {
            let text = code(&std::fs::read_to_string(p).unwrap());
            ["env::var(", "env::var_os(", "env::vars("]
                .iter()
                .any(|needle| text.contains(needle))
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "process environment read in {offenders:?}"
    );
}
