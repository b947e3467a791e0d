//! Conditions over window aggregates: `p99(latency_ms) > 250 and count() >= 20`.
//!
//! ```text
//! cond    := or
//! or      := and ("or" and)*
//! and     := not ("and" not)*
//! not     := "not" not | cmp
//! cmp     := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)?
//! sum     := product (("+" | "-") product)*
//! product := unary (("*" | "/") unary)*
//! unary   := "-" unary | atom
//! atom    := NUMBER | call | "(" cond ")"
//! call    := NAME "(" [NAME | NUMBER ("," NUMBER)?] ")"
//! ```
//! Functions: `count()` (events), `count(m)`, `sum(m)`, `min(m)`, `max(m)`, `mean(m)` (or
//! `avg`), `rate()` (events/s), `rate(m)` (sum of m per second), `p50(m)`, `p90(m)`, `p95(m)`,
//! `p99(m)`, `quantile(m, q)`, and the boolean `no_data()` (the window has no events).
//!
//! Evaluation is three-valued: an aggregate of a measurement the window lacks is *unknown*,
//! a comparison with an unknown is unknown, `and`/`or`/`not` follow SQL's rules, and an
//! unknown condition does not hold. Types are checked at parse time.

use std::fmt;

use crate::window::WindowSummary;

mod lex;
#[cfg(test)]
mod tests;
use lex::*;

/// A parse error with its 1-based column in the condition text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "column {}: {}", self.column, self.message)
    }
}

impl ParseError {
    /// The message with the condition and a caret under the column.
    pub fn render(&self, text: &str) -> String {
        format!(
            "column {}: {}\n    {}\n    {}^",
            self.column,
            self.message,
            text,
            " ".repeat(self.column.saturating_sub(1))
        )
    }
}

/// An aggregate function of a window.
#[derive(Debug, Clone, PartialEq)]
pub enum Agg {
    Count(Option<String>),
    Sum(String),
    Min(String),
    Max(String),
    Mean(String),
    Rate(Option<String>),
    Quantile(String, f64),
    NoData,
}

impl fmt::Display for Agg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Agg::Count(None) => write!(f, "count()"),
            Agg::Count(Some(m)) => write!(f, "count({m})"),
            Agg::Sum(m) => write!(f, "sum({m})"),
            Agg::Min(m) => write!(f, "min({m})"),
            Agg::Max(m) => write!(f, "max({m})"),
            Agg::Mean(m) => write!(f, "mean({m})"),
            Agg::Rate(None) => write!(f, "rate()"),
            Agg::Rate(Some(m)) => write!(f, "rate({m})"),
            Agg::Quantile(m, q) => {
                let named = [(0.5, "p50"), (0.9, "p90"), (0.95, "p95"), (0.99, "p99")];
                match named.iter().find(|(v, _)| v == q) {
                    Some((_, name)) => write!(f, "{name}({m})"),
                    None => write!(f, "quantile({m}, {q})"),
                }
            }
            Agg::NoData => write!(f, "no_data()"),
        }
    }
}

impl Agg {
    /// The aggregate's value in a window; `None` when the window lacks the measurement.
    pub fn value(&self, w: &WindowSummary) -> Option<f64> {
        match self {
            Agg::Count(None) => Some(w.count as f64),
            Agg::Count(Some(m)) => Some(w.measurement(m).map_or(0.0, |s| s.count as f64)),
            Agg::Sum(m) => Some(w.measurement(m).map_or(0.0, |s| s.sum)),
            Agg::Min(m) => w.measurement(m).filter(|s| s.count > 0).map(|s| s.min),
            Agg::Max(m) => w.measurement(m).filter(|s| s.count > 0).map(|s| s.max),
            Agg::Mean(m) => w.measurement(m).and_then(|s| s.mean()),
            Agg::Rate(None) => Some(w.rate()),
            Agg::Rate(Some(m)) => Some(w.rate_of(m)),
            Agg::Quantile(m, q) => w.measurement(m).and_then(|s| s.quantile(*q)),
            Agg::NoData => Some(if w.count == 0 { 1.0 } else { 0.0 }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl CmpOp {
    fn as_str(self) -> &'static str {
        match self {
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
        }
    }

    fn apply(self, a: f64, b: f64) -> bool {
        match self {
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// A numeric expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Num {
    Lit(f64),
    Agg(Agg),
    Neg(Box<Num>),
    Arith(ArithOp, Box<Num>, Box<Num>),
}

impl Num {
    /// The expression's value in a window; `None` when an aggregate has no value.
    pub fn eval(&self, w: &WindowSummary) -> Option<f64> {
        match self {
            Num::Lit(v) => Some(*v),
            Num::Agg(a) => a.value(w),
            Num::Neg(n) => n.eval(w).map(|v| -v),
            Num::Arith(op, a, b) => {
                let (a, b) = (a.eval(w)?, b.eval(w)?);
                let v = match op {
                    ArithOp::Add => a + b,
                    ArithOp::Sub => a - b,
                    ArithOp::Mul => a * b,
                    ArithOp::Div => a / b,
                };
                v.is_finite().then_some(v)
            }
        }
    }
}

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Num::Lit(v) => write!(f, "{v}"),
            Num::Agg(a) => write!(f, "{a}"),
            Num::Neg(n) => write!(f, "-{n}"),
            Num::Arith(op, a, b) => {
                let op = match op {
                    ArithOp::Add => "+",
                    ArithOp::Sub => "-",
                    ArithOp::Mul => "*",
                    ArithOp::Div => "/",
                };
                write!(f, "({a} {op} {b})")
            }
        }
    }
}

/// A boolean condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    Cmp(CmpOp, Num, Num),
    NoData,
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    Not(Box<Cond>),
}

/// The comparison that decided a condition, for a command's `reason`.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    pub metric: String,
    pub observed: f64,
    pub threshold: f64,
}

impl Cond {
    /// Whether the condition holds (unknown does not).
    pub fn holds(&self, w: &WindowSummary) -> bool {
        self.eval(w) == Some(true)
    }

    /// Three-valued evaluation.
    pub fn eval(&self, w: &WindowSummary) -> Option<bool> {
        match self {
            Cond::Cmp(op, a, b) => Some(op.apply(a.eval(w)?, b.eval(w)?)),
            Cond::NoData => Some(w.count == 0),
            Cond::And(a, b) => match (a.eval(w), b.eval(w)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Cond::Or(a, b) => match (a.eval(w), b.eval(w)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            Cond::Not(a) => a.eval(w).map(|b| !b),
        }
    }

    /// The condition's headline comparison: the first (left to right) that compares an
    /// expression with a literal, as (expression, literal). Reports plot this.
    pub fn primary(&self) -> Option<(&Num, f64)> {
        match self {
            Cond::Cmp(_, Num::Lit(x), b) if !matches!(b, Num::Lit(_)) => Some((b, *x)),
            Cond::Cmp(_, a, Num::Lit(x)) if !matches!(a, Num::Lit(_)) => Some((a, *x)),
            Cond::Cmp(..) | Cond::NoData => None,
            Cond::And(a, b) | Cond::Or(a, b) => a.primary().or_else(|| b.primary()),
            Cond::Not(a) => a.primary(),
        }
    }

    /// The first comparison (left to right) that holds, as metric / observed / threshold.
    pub fn evidence(&self, w: &WindowSummary) -> Option<Evidence> {
        match self {
            Cond::Cmp(op, a, b) => {
                let (x, y) = (a.eval(w)?, b.eval(w)?);
                op.apply(x, y).then(|| {
                    // Put the aggregate on the metric side.
                    if matches!(a, Num::Lit(_)) && !matches!(b, Num::Lit(_)) {
                        Evidence {
                            metric: b.to_string(),
                            observed: y,
                            threshold: x,
                        }
                    } else {
                        Evidence {
                            metric: a.to_string(),
                            observed: x,
                            threshold: y,
                        }
                    }
                })
            }
            Cond::NoData => (w.count == 0).then(|| Evidence {
                metric: "no_data()".into(),
                observed: 1.0,
                threshold: 1.0,
            }),
            Cond::And(a, b) | Cond::Or(a, b) => a.evidence(w).or_else(|| b.evidence(w)),
            Cond::Not(_) => None,
        }
    }

    /// Every aggregate the condition reads, with its value in `w` (for decision records).
    pub fn aggregates(&self, w: &WindowSummary, out: &mut Vec<(String, f64)>) {
        fn num(n: &Num, w: &WindowSummary, out: &mut Vec<(String, f64)>) {
            match n {
                Num::Agg(a) => {
                    if let Some(v) = a.value(w) {
                        let k = a.to_string();
                        if !out.iter().any(|(x, _)| *x == k) {
                            out.push((k, v));
                        }
                    }
                }
                Num::Neg(x) => num(x, w, out),
                Num::Arith(_, x, y) => {
                    num(x, w, out);
                    num(y, w, out);
                }
                Num::Lit(_) => {}
            }
        }
        match self {
            Cond::Cmp(_, a, b) => {
                num(a, w, out);
                num(b, w, out);
            }
            Cond::NoData => {
                if !out.iter().any(|(k, _)| k == "count()") {
                    out.push(("count()".into(), w.count as f64));
                }
            }
            Cond::And(a, b) | Cond::Or(a, b) => {
                a.aggregates(w, out);
                b.aggregates(w, out);
            }
            Cond::Not(a) => a.aggregates(w, out),
        }
    }
}

impl fmt::Display for Cond {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cond::Cmp(op, a, b) => write!(f, "{a} {} {b}", op.as_str()),
            Cond::NoData => write!(f, "no_data()"),
            Cond::And(a, b) => write!(f, "({a} and {b})"),
            Cond::Or(a, b) => write!(f, "({a} or {b})"),
            Cond::Not(a) => write!(f, "not {a}"),
        }
    }
}

// ---- tokens --------------------------------------------------------------------------------

enum Expr {
    Num(Num),
    Bool(Cond),
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    /// Nesting of `(`, `not` and unary `-` at the current position.
    depth: usize,
}

/// Longest condition, in bytes.
pub const MAX_CONDITION_BYTES: usize = 4096;
/// Most tokens in a condition (operators and operands: it bounds the tree's depth).
pub const MAX_TOKENS: usize = 512;
/// Deepest nesting of `(`, `not` and unary `-`.
pub const MAX_NESTING: usize = 32;

/// Parses a condition; the result must be boolean. Conditions are bounded
/// ([`MAX_CONDITION_BYTES`], [`MAX_TOKENS`], [`MAX_NESTING`]) so neither parsing, evaluating
/// nor dropping one can exhaust the stack.
pub fn parse(text: &str) -> Result<Cond, ParseError> {
    if text.len() > MAX_CONDITION_BYTES {
        return Err(ParseError {
            column: 1,
            message: format!(
                "the condition is {} bytes; at most {MAX_CONDITION_BYTES} are allowed",
                text.len()
            ),
        });
    }
    let toks = tokenize(text)?;
    if toks.len() > MAX_TOKENS {
        return Err(ParseError {
            column: toks[MAX_TOKENS].1,
            message: format!(
                "the condition has {} tokens; at most {MAX_TOKENS} are allowed",
                toks.len()
            ),
        });
    }
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
    };
    let col = p.col();
    let e = p.or()?;
    if p.peek() != &Tok::End {
        return Err(p.error(format!(
            "expected `and`, `or` or the end, found {}",
            describe(p.peek())
        )));
    }
    match e {
        Expr::Bool(c) => Ok(c),
        Expr::Num(_) => Err(ParseError {
            column: col,
            message: "a condition must compare, e.g. `p99(latency_ms) > 250`".into(),
        }),
    }
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.pos].0
    }

    fn col(&self) -> usize {
        self.toks[self.pos].1
    }

    fn next(&mut self) -> Tok {
        let t = self.toks[self.pos].0.clone();
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn error(&self, message: String) -> ParseError {
        ParseError {
            column: self.col(),
            message,
        }
    }

    /// Enters one nesting level (`(`, `not`, unary `-`).
    fn deeper(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(self.error(format!(
                "nested more than {MAX_NESTING} levels deep; simplify the condition"
            )));
        }
        Ok(())
    }

    fn expect(&mut self, t: Tok, what: &str) -> Result<(), ParseError> {
        if *self.peek() == t {
            self.next();
            Ok(())
        } else {
            Err(self.error(format!("expected {what}, found {}", describe(self.peek()))))
        }
    }

    fn boolean(&self, e: Expr, col: usize, op: &str) -> Result<Cond, ParseError> {
        match e {
            Expr::Bool(c) => Ok(c),
            Expr::Num(_) => Err(ParseError {
                column: col,
                message: format!("`{op}` needs a comparison here, not a number"),
            }),
        }
    }

    fn number(&self, e: Expr, col: usize) -> Result<Num, ParseError> {
        match e {
            Expr::Num(n) => Ok(n),
            Expr::Bool(_) => Err(ParseError {
                column: col,
                message: "a number is needed here, not a condition".into(),
            }),
        }
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let col = self.col();
        let mut left = self.and()?;
        while self.peek() == &Tok::Or {
            self.next();
            let rcol = self.col();
            let right = self.and()?;
            let l = self.boolean(left, col, "or")?;
            let r = self.boolean(right, rcol, "or")?;
            left = Expr::Bool(Cond::Or(Box::new(l), Box::new(r)));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let col = self.col();
        let mut left = self.not()?;
        while self.peek() == &Tok::And {
            self.next();
            let rcol = self.col();
            let right = self.not()?;
            let l = self.boolean(left, col, "and")?;
            let r = self.boolean(right, rcol, "and")?;
            left = Expr::Bool(Cond::And(Box::new(l), Box::new(r)));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, ParseError> {
        if self.peek() == &Tok::Not {
            self.next();
            self.deeper()?;
            let col = self.col();
            let inner = self.not()?;
            self.depth -= 1;
            let c = self.boolean(inner, col, "not")?;
            return Ok(Expr::Bool(Cond::Not(Box::new(c))));
        }
        self.cmp()
    }

    fn cmp(&mut self) -> Result<Expr, ParseError> {
        let col = self.col();
        let left = self.sum()?;
        if let Tok::Cmp(op) = *self.peek() {
            self.next();
            let rcol = self.col();
            let right = self.sum()?;
            let l = self.number(left, col)?;
            let r = self.number(right, rcol)?;
            return Ok(Expr::Bool(Cond::Cmp(op, l, r)));
        }
        Ok(left)
    }

    fn sum(&mut self) -> Result<Expr, ParseError> {
        let col = self.col();
        let mut left = self.product()?;
        while let Tok::Arith(op @ (ArithOp::Add | ArithOp::Sub)) = *self.peek() {
            self.next();
            let rcol = self.col();
            let right = self.product()?;
            let l = self.number(left, col)?;
            let r = self.number(right, rcol)?;
            left = Expr::Num(Num::Arith(op, Box::new(l), Box::new(r)));
        }
        Ok(left)
    }

    fn product(&mut self) -> Result<Expr, ParseError> {
        let col = self.col();
        let mut left = self.unary()?;
        while let Tok::Arith(op @ (ArithOp::Mul | ArithOp::Div)) = *self.peek() {
            self.next();
            let rcol = self.col();
            let right = self.unary()?;
            let l = self.number(left, col)?;
            let r = self.number(right, rcol)?;
            left = Expr::Num(Num::Arith(op, Box::new(l), Box::new(r)));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        if self.peek() == &Tok::Arith(ArithOp::Sub) {
            self.next();
            self.deeper()?;
            let col = self.col();
            let inner = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Num(Num::Neg(Box::new(self.number(inner, col)?))));
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Expr, ParseError> {
        let col = self.col();
        match self.next() {
            Tok::Num(v) => Ok(Expr::Num(Num::Lit(v))),
            Tok::LParen => {
                self.deeper()?;
                let e = self.or()?;
                self.expect(Tok::RParen, "`)`")?;
                self.depth -= 1;
                Ok(e)
            }
            Tok::Ident(name) => self.call(name, col),
            other => Err(ParseError {
                column: col,
                message: format!(
                    "expected a number, a function such as p99(latency_ms), or `(`; found {}",
                    describe(&other)
                ),
            }),
        }
    }

    fn call(&mut self, name: String, col: usize) -> Result<Expr, ParseError> {
        if self.peek() != &Tok::LParen {
            return Err(self.error(format!("`{name}` must be called, e.g. {name}(latency_ms)")));
        }
        self.next();
        let mut measurement = None;
        let mut q = None;
        if let Tok::Ident(m) = self.peek().clone() {
            self.next();
            measurement = Some(m);
            if self.peek() == &Tok::Comma {
                self.next();
                match self.next() {
                    Tok::Num(v) => q = Some(v),
                    other => {
                        return Err(ParseError {
                            column: self.toks[self.pos.saturating_sub(1)].1,
                            message: format!(
                                "expected a quantile between 0 and 1, found {}",
                                describe(&other)
                            ),
                        })
                    }
                }
            }
        }
        self.expect(Tok::RParen, "`)`")?;
        let need = |m: Option<String>| {
            m.ok_or_else(|| ParseError {
                column: col,
                message: format!("{name}() needs a measurement, e.g. {name}(latency_ms)"),
            })
        };
        let none = |m: &Option<String>, what: &str| -> Result<(), ParseError> {
            match m {
                Some(_) => Err(ParseError {
                    column: col,
                    message: format!("{what} takes no measurement"),
                }),
                None => Ok(()),
            }
        };
        let agg = match name.as_str() {
            "count" => Agg::Count(measurement),
            "rate" => Agg::Rate(measurement),
            "sum" => Agg::Sum(need(measurement)?),
            "min" => Agg::Min(need(measurement)?),
            "max" => Agg::Max(need(measurement)?),
            "mean" | "avg" => Agg::Mean(need(measurement)?),
            "p50" => Agg::Quantile(need(measurement)?, 0.5),
            "p90" => Agg::Quantile(need(measurement)?, 0.9),
            "p95" => Agg::Quantile(need(measurement)?, 0.95),
            "p99" => Agg::Quantile(need(measurement)?, 0.99),
            "quantile" => {
                let m = need(measurement)?;
                match q {
                    Some(q) if (0.0..=1.0).contains(&q) => Agg::Quantile(m, q),
                    _ => {
                        return Err(ParseError {
                            column: col,
                            message: "quantile(m, q) needs q between 0 and 1".into(),
                        })
                    }
                }
            }
            "no_data" => {
                none(&measurement, "no_data()")?;
                return Ok(Expr::Bool(Cond::NoData));
            }
            _ => {
                return Err(ParseError {
                    column: col,
                    message: format!(
                        "unknown function `{name}`; use count, sum, min, max, mean, rate, p50, \
                         p90, p95, p99, quantile or no_data"
                    ),
                })
            }
        };
        if q.is_some() && !matches!(agg, Agg::Quantile(..)) {
            return Err(ParseError {
                column: col,
                message: format!("{name}() takes one argument"),
            });
        }
        Ok(Expr::Num(Num::Agg(agg)))
    }
}

/// The quantile measurements a condition reads (so config checks can ask for sketches).
pub fn quantile_measurements(c: &Cond, out: &mut Vec<String>) {
    fn num(n: &Num, out: &mut Vec<String>) {
        match n {
            Num::Agg(Agg::Quantile(m, _)) if !out.contains(m) => out.push(m.clone()),
            Num::Neg(x) => num(x, out),
            Num::Arith(_, x, y) => {
                num(x, out);
                num(y, out);
            }
            _ => {}
        }
    }
    match c {
        Cond::Cmp(_, a, b) => {
            num(a, out);
            num(b, out);
        }
        Cond::And(a, b) | Cond::Or(a, b) => {
            quantile_measurements(a, out);
            quantile_measurements(b, out);
        }
        Cond::Not(a) => quantile_measurements(a, out),
        Cond::NoData => {}
    }
}
