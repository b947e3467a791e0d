//! Unit tests of the condition language.

use super::*;

#[test]
fn parses_the_documented_examples() {
    for text in [
        "p99(latency_ms) > 250 and count() >= 20",
        "mean(error) > 0.05",
        "no_data()",
        "rate(error) > 2.5",
        "not (p50(latency_ms) <= 100 or count() < 5)",
        "quantile(latency_ms, 0.999) > 2 * p50(latency_ms)",
        "-1 < min(cpu) and max(cpu) != 1e3",
    ] {
        parse(text).unwrap_or_else(|e| panic!("{text}: {}", e.render(text)));
    }
}

#[test]
fn precedence_is_not_then_and_then_or() {
    let c = parse("count() > 1 or count() > 2 and not count() > 3").unwrap();
    assert_eq!(
        c.to_string(),
        "(count() > 1 or (count() > 2 and not count() > 3))"
    );
}

#[test]
fn errors_point_at_the_column() {
    let cases = [
        ("p99(latency_ms) > ", 19, "expected a number"),
        ("p99(latency_ms) >> 3", 18, "expected a number"),
        ("p98(latency_ms) > 3", 1, "unknown function `p98`"),
        ("count() > 3 and", 16, "expected a number"),
        ("mean() > 1", 1, "needs a measurement"),
        ("p99(latency_ms)", 1, "must compare"),
        ("count() > 1 and 5", 17, "needs a comparison"),
        ("(count() > 1", 13, "expected `)`"),
        ("count() = 1", 9, "use =="),
        ("count() > 1 garbage", 13, "expected `and`"),
        ("quantile(x, 2) > 1", 1, "between 0 and 1"),
        ("no_data(x)", 1, "takes no measurement"),
        ("count > 1", 7, "must be called"),
        ("count() > 1 $", 13, "unexpected character"),
    ];
    for (text, column, msg) in cases {
        let e = parse(text).expect_err(text);
        assert_eq!(e.column, column, "{text}: {}", e.render(text));
        assert!(e.message.contains(msg), "{text}: {}", e.message);
    }
}

#[test]
fn render_puts_a_caret_under_the_column() {
    let text = "count() > ";
    let e = parse(text).unwrap_err();
    let r = e.render(text);
    let lines: Vec<&str> = r.lines().collect();
    assert_eq!(lines[2].find('^'), Some(4 + e.column - 1));
}
