//! The fuzz corpus replayed on the stable toolchain: every committed input of every target
//! (`fuzz/corpus/<target>/`, the seeds, the hostile cases of issue #21 and every crash the
//! fuzzers found) goes through the target's function (`segloop::fuzz`), which must not panic.

use std::time::Instant;

#[test]
fn every_corpus_input_runs_without_a_panic() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let started = Instant::now();
    let mut total = 0;
    for (name, target) in segloop::fuzz::TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "no corpus for {name}");
        for path in &inputs {
            let data = std::fs::read(path).unwrap();
            if std::env::var_os("FUZZ_CORPUS_VERBOSE").is_some() {
                eprintln!("{name}: {}", path.display());
            }
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name}: {} panics", path.display());
        }
        total += inputs.len();
    }
    println!(
        "replayed {total} corpus inputs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The hostile cases of issue #21 behave as specified, not merely without a panic: a deeply
/// nested condition and a policy file holding one are refused with an error naming the limit.
#[test]
fn hostile_corpus_cases_are_refused_with_their_limit() {
    let deep = format!("{}count(){} > 1", "(".repeat(10_000), ")".repeat(10_000));
    let err = segloop::policy::expr::parse(&deep).unwrap_err().to_string();
    assert!(err.contains("at most 4096 are allowed"), "{err}");
    let deep = format!("{}count(){} > 1", "(".repeat(40), ")".repeat(40));
    let err = segloop::policy::expr::parse(&deep).unwrap_err().to_string();
    assert!(err.contains("nest"), "{err}");
    let file = format!("[[policies]]\nname = \"p\"\naction = \"page\"\nwhen = \"{deep}\"\n");
    let err = segloop::policy::PolicySet::parse(&file, "p.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("policy `p`") && err.contains("nest"), "{err}");
}
