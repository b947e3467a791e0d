//! The condition language's tokens.

use super::*;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
    Num(f64),
    Ident(String),
    LParen,
    RParen,
    Comma,
    Cmp(CmpOp),
    Arith(ArithOp),
    And,
    Or,
    Not,
    End,
}

pub(super) fn describe(t: &Tok) -> String {
    match t {
        Tok::Num(v) => format!("number {v}"),
        Tok::Ident(s) => format!("`{s}`"),
        Tok::LParen => "`(`".into(),
        Tok::RParen => "`)`".into(),
        Tok::Comma => "`,`".into(),
        Tok::Cmp(op) => format!("`{}`", op.as_str()),
        Tok::Arith(_) => "an arithmetic operator".into(),
        Tok::And => "`and`".into(),
        Tok::Or => "`or`".into(),
        Tok::Not => "`not`".into(),
        Tok::End => "the end of the condition".into(),
    }
}

pub(super) fn tokenize(text: &str) -> Result<Vec<(Tok, usize)>, ParseError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let tok = match c {
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            ',' => Tok::Comma,
            '+' => Tok::Arith(ArithOp::Add),
            '-' => Tok::Arith(ArithOp::Sub),
            '*' => Tok::Arith(ArithOp::Mul),
            '/' => Tok::Arith(ArithOp::Div),
            '<' | '>' | '=' | '!' => {
                let (op, len) = match two.as_str() {
                    "<=" => (CmpOp::Le, 2),
                    ">=" => (CmpOp::Ge, 2),
                    "==" => (CmpOp::Eq, 2),
                    "!=" => (CmpOp::Ne, 2),
                    _ if c == '<' => (CmpOp::Lt, 1),
                    _ if c == '>' => (CmpOp::Gt, 1),
                    _ => {
                        return Err(ParseError {
                            column: col,
                            message: format!("unexpected `{c}`; use == or != to compare"),
                        })
                    }
                };
                out.push((Tok::Cmp(op), col));
                i += len;
                continue;
            }
            c if c.is_ascii_digit() || c == '.' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_digit()
                        || chars[i] == '.'
                        || chars[i] == 'e'
                        || chars[i] == 'E'
                        || ((chars[i] == '-' || chars[i] == '+')
                            && matches!(chars[i - 1], 'e' | 'E')))
                {
                    i += 1;
                }
                let s: String = chars[start..i].iter().collect();
                let v: f64 = s.parse().map_err(|_| ParseError {
                    column: col,
                    message: format!("`{s}` is not a number"),
                })?;
                if !v.is_finite() {
                    return Err(ParseError {
                        column: col,
                        message: format!("`{s}` is out of range (numbers must be finite)"),
                    });
                }
                out.push((Tok::Num(v), col));
                continue;
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
                {
                    i += 1;
                }
                let s: String = chars[start..i].iter().collect();
                let tok = match s.as_str() {
                    "and" => Tok::And,
                    "or" => Tok::Or,
                    "not" => Tok::Not,
                    _ => Tok::Ident(s),
                };
                out.push((tok, col));
                continue;
            }
            _ => {
                return Err(ParseError {
                    column: col,
                    message: format!("unexpected character `{c}`"),
                })
            }
        };
        out.push((tok, col));
        i += 1;
    }
    out.push((Tok::End, chars.len() + 1));
    Ok(out)
}

// ---- parser --------------------------------------------------------------------------------
