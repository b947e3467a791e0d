//! Unit tests of loading.

use super::*;

#[test]
fn line_col_counts_from_one() {
    assert_eq!(line_col("a\nbc\n", 0), (1, 1));
    assert_eq!(line_col("a\nbc\n", 3), (2, 2));
}

#[test]
fn key_paths_keep_quoted_dots() {
    assert_eq!(
        split_key_path("kafka.properties.\"session.timeout.ms\""),
        ["kafka", "properties", "session.timeout.ms"]
    );
    assert_eq!(split_key_path("windows.size"), ["windows", "size"]);
}

#[test]
fn scalars_parse_as_toml_or_string() {
    assert_eq!(parse_scalar("5"), toml::Value::Integer(5));
    assert_eq!(parse_scalar("true"), toml::Value::Boolean(true));
    assert_eq!(parse_scalar("5s"), toml::Value::String("5s".into()));
    assert_eq!(
        parse_scalar("127.0.0.1:9092"),
        toml::Value::String("127.0.0.1:9092".into())
    );
}
