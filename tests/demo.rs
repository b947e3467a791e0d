//! The demo's scripted story, shortened, as a test: every incident goes as scripted, nothing
//! healthy is acted on, every record is accounted for.

use std::path::Path;

use segloop::demo::{run, DemoOptions};
use segloop::fleet::FaultKind;

#[test]
fn the_scripted_story_goes_as_expected() {
    let opts = DemoOptions {
        duration_s: 40,
        seed: 11,
        config_path: Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml"),
        live: false,
    };
    let s = run(&opts).unwrap();
    let table: Vec<String> = s
        .incidents
        .iter()
        .map(|r| {
            format!(
                "{:?} {} expected {} got {} {:?}",
                r.kind, r.segment, r.expected, r.actual, r.commands
            )
        })
        .collect();
    for r in &s.incidents {
        assert!(r.ok, "incident not as scripted:\n{}", table.join("\n"));
    }
    assert_eq!(s.false_positives, 0, "{:?}", s.false_positive_commands);
    assert_eq!(s.incidents_injected, 8);
    assert_eq!(s.incidents_resolved, 4);
    assert_eq!(s.incidents_escalated, 3);
    assert_eq!(s.records_produced, s.records_consumed);
    assert_eq!(s.records_consumed, s.records_aggregated + s.records_dlq);
    assert!(s.passed);
    // The parent-level fault acted on the parent only.
    let parent = s
        .incidents
        .iter()
        .find(|r| r.kind == FaultKind::ParentFault)
        .unwrap();
    assert_eq!(parent.actual, "resolved");
    assert!(!parent.segment.contains("/ep-"));
}

/// The built-in demo config (what `segloop demo` uses outside the repository) is the shipped
/// one and loads with its policies.
#[test]
fn the_builtin_demo_config_is_the_shipped_one_and_loads() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    assert_eq!(
        segloop::demo::BUILTIN_CONFIG,
        std::fs::read_to_string(root.join("config/demo.toml")).unwrap()
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("demo.toml"), segloop::demo::BUILTIN_CONFIG).unwrap();
    std::fs::write(
        dir.path().join("demo-policies.toml"),
        segloop::demo::BUILTIN_POLICIES,
    )
    .unwrap();
    let config = segloop::config::Config::load(&segloop::config::Sources {
        file: Some(&dir.path().join("demo.toml")),
        env: &Default::default(),
        overrides: &[],
    })
    .unwrap();
    let set = segloop::policy::PolicySet::for_config(&config).unwrap();
    assert!(set.policies.len() >= 2);
}
