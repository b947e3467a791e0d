//! Unit tests of the engine's parts.

use super::*;

fn seg(name: &str) -> SegmentWindows {
    SegmentWindows::new(name, 0, 0, 0)
}

#[test]
fn short_eq_finds_a_difference_at_any_position() {
    for n in 0..=INLINE_KEY {
        let a: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37)).collect();
        assert!(short_eq(&a, &a.clone()));
        for at in 0..n {
            let mut b = a.clone();
            b[at] ^= 0x40;
            assert!(!short_eq(&a, &b), "n={n} at={at}");
        }
    }
}

#[test]
fn slots_tell_apart_long_names_that_share_the_inline_prefix() {
    let long = "region-0/cluster-07/service-checkout/endpoint-";
    let a = seg(&format!("{long}1"));
    assert!(a.is(&format!("{long}1")));
    assert!(!a.is(&format!("{long}2")));
    assert!(!a.is(&format!("{long}10")));
    assert!(!a.is(long));
    let short = seg("us-1/auth");
    assert!(short.is("us-1/auth"));
    assert!(!short.is("us-1/autH"));
    assert!(!short.is("us-1/auth/"));
}

#[test]
fn segment_table_stays_consistent_under_churn() {
    let mut t = SegmentTable::default();
    let mut model = std::collections::BTreeSet::new();
    let mut x = 12345u64;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let name = format!("seg-{}", x % 500);
        if x % 3 == 0 {
            assert_eq!(t.remove(&name), model.remove(&name));
        } else if t.find(&name).is_none() {
            t.insert(seg(&name));
            model.insert(name);
        }
        if x % 97 == 0 {
            for name in &model {
                let i = t.find(name).expect("present");
                assert_eq!(&*t.slots[i].name, name.as_str());
            }
        }
    }
    assert_eq!(t.len(), model.len());
    for name in &model {
        let i = t.find(name).expect("present");
        assert_eq!(&*t.slots[i].name, name.as_str());
    }
    assert!(t.find("absent").is_none());
}
