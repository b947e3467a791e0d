//! Unit tests of the Kafka helpers.

use super::*;

/// A broker that is down fails every reconnect: one line per kind per interval, and the
/// next line says how many were not logged.
#[test]
fn repeated_client_errors_are_collapsed() {
    let c = Collapse::new(std::time::Duration::from_millis(200));
    assert_eq!(c.admit("AllBrokersDown"), Some(0));
    for _ in 0..50 {
        assert_eq!(c.admit("AllBrokersDown"), None);
    }
    assert_eq!(c.admit("BrokerTransportFailure"), Some(0), "kinds apart");
    std::thread::sleep(std::time::Duration::from_millis(250));
    assert_eq!(c.admit("AllBrokersDown"), Some(50));
    assert_eq!(c.admit("AllBrokersDown"), None);
    // Bounded: many kinds never grow it past 256.
    for i in 0..1_000 {
        c.admit(&format!("kind {i}"));
    }
    assert!(c.seen.lock().unwrap().len() <= 256);
}

/// Kafka's published vectors (clients/src/test/java/.../UtilsTest.java, testMurmur2).
#[test]
fn murmur2_matches_kafka_test_vectors() {
    let cases: [(&[u8], i32); 6] = [
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58897971,
        ),
        (b"abc", 479470107),
    ];
    for (key, want) in cases {
        assert_eq!(
            murmur2(key) as i32,
            want,
            "{}",
            String::from_utf8_lossy(key)
        );
    }
}
