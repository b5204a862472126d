//! The WIQL subset a sync engine needs: `SELECT [f], … FROM WorkItems [WHERE …] [ORDER BY …]`
//! with `AND`/`OR`/`NOT`/parentheses, `= <> < > <= >=`, `IN`/`NOT IN`, `CONTAINS`/`NOT
//! CONTAINS` (whole tags on `System.Tags`, substrings elsewhere), `UNDER`, and the
//! `@project`, `@me`, `@today[-n]` macros. Parsing and evaluation are pure.

use std::cmp::Ordering;

use serde_json::Value;

use crate::clock;
use crate::error::ApiError;
use crate::model::{FieldDef, Identity, Kind};

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// Selected fields (reference names as written).
    pub columns: Vec<String>,
    /// The condition, if any.
    pub filter: Option<Expr>,
    /// Sort keys: field and descending.
    pub order: Vec<(String, bool)>,
}

/// A condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// Both.
    And(Box<Expr>, Box<Expr>),
    /// Either.
    Or(Box<Expr>, Box<Expr>),
    /// Negation.
    Not(Box<Expr>),
    /// `[field] op value(s)`.
    Cmp(String, Op, Vec<Lit>),
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `=`
    Eq,
    /// `<>`
    Ne,
    /// `<`
    Lt,
    /// `>`
    Gt,
    /// `<=`
    Le,
    /// `>=`
    Ge,
    /// `IN (…)`
    In,
    /// `NOT IN (…)`
    NotIn,
    /// `CONTAINS`
    Contains,
    /// `NOT CONTAINS`
    NotContains,
    /// `UNDER` (tree paths)
    Under,
}

/// A literal or macro.
#[derive(Debug, Clone, PartialEq)]
pub enum Lit {
    /// `'text'`
    Str(String),
    /// A number.
    Num(f64),
    /// `@project`
    Project,
    /// `@me`
    Me,
    /// `@today` with a day offset.
    Today(i64),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Field(String),
    Str(String),
    Num(f64),
    Macro(String),
    Sym(&'static str),
}

fn syntax(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(
        "WorkItemQueryInvalidException",
        format!("TF51006: The query statement is not valid. {}", msg.into()),
    )
}

fn lex(s: &str) -> Result<Vec<Tok>, ApiError> {
    let c: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '[' {
            let j = c[i..]
                .iter()
                .position(|&x| x == ']')
                .ok_or_else(|| syntax("A field name is not closed with ']'."))?
                + i;
            out.push(Tok::Field(c[i + 1..j].iter().collect::<String>().trim().to_string()));
            i = j + 1;
        } else if ch == '\'' || ch == '"' {
            let mut v = String::new();
            i += 1;
            loop {
                match c.get(i) {
                    None => return Err(syntax("A string is not closed.")),
                    Some(&q) if q == ch && c.get(i + 1) == Some(&ch) => {
                        v.push(ch);
                        i += 2;
                    }
                    Some(&q) if q == ch => {
                        i += 1;
                        break;
                    }
                    Some(&x) => {
                        v.push(x);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(v));
        } else if ch == '@' {
            let j = c[i + 1..]
                .iter()
                .position(|x| !x.is_alphanumeric())
                .map(|p| p + i + 1)
                .unwrap_or(c.len());
            out.push(Tok::Macro(c[i + 1..j].iter().collect::<String>().to_lowercase()));
            i = j;
        } else if ch.is_ascii_digit()
            || (ch == '-'
                && c.get(i + 1).is_some_and(|d| d.is_ascii_digit())
                && !matches!(out.last(), Some(Tok::Macro(_))))
        {
            let j = c[i + 1..]
                .iter()
                .position(|x| !(x.is_ascii_digit() || *x == '.'))
                .map(|p| p + i + 1)
                .unwrap_or(c.len());
            let n: String = c[i..j].iter().collect();
            out.push(Tok::Num(
                n.parse().map_err(|_| syntax(format!("'{n}' is not a number.")))?,
            ));
            i = j;
        } else if ch.is_alphabetic() {
            let j = c[i..]
                .iter()
                .position(|x| !(x.is_alphanumeric() || *x == '_' || *x == '.'))
                .map(|p| p + i)
                .unwrap_or(c.len());
            out.push(Tok::Word(c[i..j].iter().collect::<String>().to_uppercase()));
            i = j;
        } else {
            let two: String = c[i..(i + 2).min(c.len())].iter().collect();
            let sym = match two.as_str() {
                "<>" => Some("<>"),
                "<=" => Some("<="),
                ">=" => Some(">="),
                "!=" => Some("<>"),
                _ => None,
            };
            if let Some(s) = sym {
                out.push(Tok::Sym(s));
                i += 2;
                continue;
            }
            let s = match ch {
                '=' => "=",
                '<' => "<",
                '>' => ">",
                '(' => "(",
                ')' => ")",
                ',' => ",",
                '+' => "+",
                '-' => "-",
                '*' => "*",
                _ => return Err(syntax(format!("Unexpected character '{ch}'."))),
            };
            out.push(Tok::Sym(s));
            i += 1;
        }
    }
    Ok(out)
}

struct P {
    t: Vec<Tok>,
    i: usize,
}

impl P {
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.i)
    }
    fn word(&mut self, w: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Word(x)) if x == w) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn sym(&mut self, s: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(x)) if *x == s) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect_word(&mut self, w: &str) -> Result<(), ApiError> {
        if self.word(w) {
            Ok(())
        } else {
            Err(syntax(format!("Expected {w}.")))
        }
    }
    fn field(&mut self) -> Result<String, ApiError> {
        match self.t.get(self.i).cloned() {
            Some(Tok::Field(f)) => {
                self.i += 1;
                Ok(f)
            }
            Some(Tok::Word(w)) if w.contains('.') => {
                self.i += 1;
                Ok(w)
            }
            _ => Err(syntax("Expected a field name in brackets.")),
        }
    }
    fn or(&mut self) -> Result<Expr, ApiError> {
        let mut l = self.and()?;
        while self.word("OR") {
            l = Expr::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Expr, ApiError> {
        let mut l = self.not()?;
        while self.word("AND") {
            l = Expr::And(Box::new(l), Box::new(self.not()?));
        }
        Ok(l)
    }
    fn not(&mut self) -> Result<Expr, ApiError> {
        if self.word("NOT") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        if self.sym("(") {
            let e = self.or()?;
            if !self.sym(")") {
                return Err(syntax("Expected ')'."));
            }
            return Ok(e);
        }
        let f = self.field()?;
        let op = if self.sym("=") {
            Op::Eq
        } else if self.sym("<>") {
            Op::Ne
        } else if self.sym("<=") {
            Op::Le
        } else if self.sym(">=") {
            Op::Ge
        } else if self.sym("<") {
            Op::Lt
        } else if self.sym(">") {
            Op::Gt
        } else if self.word("IN") {
            Op::In
        } else if self.word("CONTAINS") {
            Op::Contains
        } else if self.word("UNDER") {
            Op::Under
        } else if self.word("NOT") {
            if self.word("IN") {
                Op::NotIn
            } else if self.word("CONTAINS") {
                Op::NotContains
            } else {
                return Err(syntax("Expected IN or CONTAINS after NOT."));
            }
        } else {
            return Err(syntax(format!("Expected an operator after [{f}].")));
        };
        let vals = if matches!(op, Op::In | Op::NotIn) {
            if !self.sym("(") {
                return Err(syntax("Expected '(' after IN."));
            }
            let mut v = vec![self.lit()?];
            while self.sym(",") {
                v.push(self.lit()?);
            }
            if !self.sym(")") {
                return Err(syntax("Expected ')' to close the IN list."));
            }
            v
        } else {
            vec![self.lit()?]
        };
        Ok(Expr::Cmp(f, op, vals))
    }
    fn lit(&mut self) -> Result<Lit, ApiError> {
        let t = self.t.get(self.i).cloned();
        self.i += 1;
        match t {
            Some(Tok::Str(s)) => Ok(Lit::Str(s)),
            Some(Tok::Num(n)) => Ok(Lit::Num(n)),
            Some(Tok::Macro(m)) => match m.as_str() {
                "project" => Ok(Lit::Project),
                "me" => Ok(Lit::Me),
                "today" => {
                    let sign = if self.sym("-") {
                        -1
                    } else if self.sym("+") {
                        1
                    } else {
                        return Ok(Lit::Today(0));
                    };
                    match self.t.get(self.i).cloned() {
                        Some(Tok::Num(n)) => {
                            self.i += 1;
                            Ok(Lit::Today(sign * n as i64))
                        }
                        _ => Err(syntax("Expected a number of days after @today.")),
                    }
                }
                other => Err(syntax(format!("The macro @{other} is not supported."))),
            },
            _ => Err(syntax("Expected a value.")),
        }
    }
}

/// Parses a WIQL statement.
pub fn parse(text: &str) -> Result<Query, ApiError> {
    let mut p = P { t: lex(text)?, i: 0 };
    p.expect_word("SELECT")?;
    let mut columns = Vec::new();
    if !p.sym("*") {
        columns.push(p.field()?);
        while p.sym(",") {
            columns.push(p.field()?);
        }
    }
    p.expect_word("FROM")?;
    if !(p.word("WORKITEMS") || p.word("WORKITEM")) {
        return Err(syntax("Only FROM WorkItems is supported (no link queries)."));
    }
    let filter = if p.word("WHERE") { Some(p.or()?) } else { None };
    let mut order = Vec::new();
    if p.word("ORDER") {
        p.expect_word("BY")?;
        loop {
            let f = p.field()?;
            let desc = if p.word("DESC") {
                true
            } else {
                p.word("ASC");
                false
            };
            order.push((f, desc));
            if !p.sym(",") {
                break;
            }
        }
    }
    if p.word("ASOF") {
        return Err(syntax("ASOF is not supported by the simulator."));
    }
    if p.i != p.t.len() {
        return Err(syntax("Unexpected text after the end of the query."));
    }
    Ok(Query { columns, filter, order })
}

/// What evaluation needs from the outside: the field catalogue, macros' values, precision.
pub struct Ctx<'a> {
    /// Looks a field up by reference name.
    pub field: &'a dyn Fn(&str) -> Option<FieldDef>,
    /// `@project`, when the request names one.
    pub project: Option<&'a str>,
    /// `@me`.
    pub me: &'a Identity,
    /// Now, for `@today`.
    pub now_ms: i64,
    /// `timePrecision=true`: date literals may carry a time and compare to the millisecond.
    pub time_precision: bool,
}

/// Checks every field the query names exists and macros can be resolved.
pub fn validate(q: &Query, ctx: &Ctx) -> Result<(), ApiError> {
    let unknown = |f: &str| {
        ApiError::bad_request(
            "WorkItemQueryInvalidException",
            format!("TF51005: The query references a field that does not exist. The error is caused by «[{f}]»."),
        )
    };
    for f in q.columns.iter().chain(q.order.iter().map(|(f, _)| f)) {
        (ctx.field)(f).ok_or_else(|| unknown(f))?;
    }
    fn walk(e: &Expr, ctx: &Ctx, unknown: &dyn Fn(&str) -> ApiError) -> Result<(), ApiError> {
        match e {
            Expr::And(a, b) | Expr::Or(a, b) => {
                walk(a, ctx, unknown)?;
                walk(b, ctx, unknown)
            }
            Expr::Not(a) => walk(a, ctx, unknown),
            Expr::Cmp(f, _, vals) => {
                let def = (ctx.field)(f).ok_or_else(|| unknown(f))?;
                for v in vals {
                    if *v == Lit::Project && ctx.project.is_none() {
                        return Err(ApiError::bad_request(
                            "WorkItemQueryInvalidException",
                            "TF51011: The specified project macro @project needs a project in the request URL.",
                        ));
                    }
                    if let (Kind::DateTime, Lit::Str(s)) = (def.kind, v) {
                        let p = clock::parse(s).ok_or_else(|| syntax(format!("'{s}' is not a date.")))?;
                        if p.has_time && !ctx.time_precision {
                            return Err(ApiError::bad_request(
                                "WorkItemQueryInvalidException",
                                format!(
                                    "VS402625: Dates in WIQL queries may not include a time unless the query \
                                     runs with timePrecision=true (field [{}]).",
                                    def.reference
                                ),
                            ));
                        }
                    }
                }
                Ok(())
            }
        }
    }
    if let Some(e) = &q.filter {
        walk(e, ctx, &unknown)?;
    }
    Ok(())
}

fn lit_text(l: &Lit, ctx: &Ctx) -> String {
    match l {
        Lit::Str(s) => s.clone(),
        Lit::Num(n) => n.to_string(),
        Lit::Project => ctx.project.unwrap_or("").to_string(),
        Lit::Me => ctx.me.combined(),
        Lit::Today(d) => clock::format(clock::day_start(ctx.now_ms) + d * 86_400_000),
    }
}

/// Compares a stored value with a literal for the field's kind.
fn compare(def: &FieldDef, v: Option<&Value>, l: &Lit, ctx: &Ctx) -> Option<Ordering> {
    let v = v?;
    match def.kind {
        Kind::Integer | Kind::Double => {
            let a = v.as_f64()?;
            let b = match l {
                Lit::Num(n) => *n,
                _ => lit_text(l, ctx).parse().ok()?,
            };
            a.partial_cmp(&b)
        }
        Kind::DateTime => {
            let mut a = clock::parse(v.as_str()?)?.ms;
            let b = clock::parse(&lit_text(l, ctx))?;
            let mut b = b.ms;
            if !ctx.time_precision {
                a = clock::day_start(a);
                b = clock::day_start(b);
            }
            Some(a.cmp(&b))
        }
        Kind::Identity => {
            let have = Identity::parse(v.as_str()?);
            let want = Identity::parse(&lit_text(l, ctx));
            let same = have.unique_name.eq_ignore_ascii_case(&want.unique_name)
                || have.display_name.eq_ignore_ascii_case(&want.display_name)
                || have.combined().eq_ignore_ascii_case(&want.combined());
            Some(if same {
                Ordering::Equal
            } else {
                have.combined().to_lowercase().cmp(&want.combined().to_lowercase())
            })
        }
        _ => {
            let a = match v {
                Value::String(s) => s.to_lowercase(),
                other => other.to_string(),
            };
            Some(a.cmp(&lit_text(l, ctx).to_lowercase()))
        }
    }
}

/// Evaluates the condition on one work item's fields.
pub fn matches(e: &Expr, get: &dyn Fn(&str) -> Option<Value>, ctx: &Ctx) -> bool {
    match e {
        Expr::And(a, b) => matches(a, get, ctx) && matches(b, get, ctx),
        Expr::Or(a, b) => matches(a, get, ctx) || matches(b, get, ctx),
        Expr::Not(a) => !matches(a, get, ctx),
        Expr::Cmp(f, op, vals) => {
            let Some(def) = (ctx.field)(f) else { return false };
            let v = get(&def.reference);
            let first = &vals[0];
            let cmp = || compare(&def, v.as_ref(), first, ctx);
            match op {
                Op::Eq => match (v.as_ref(), first) {
                    (None, Lit::Str(s)) if s.is_empty() => true,
                    _ => cmp() == Some(Ordering::Equal),
                },
                Op::Ne => match (v.as_ref(), first) {
                    (None, Lit::Str(s)) => !s.is_empty(),
                    (None, _) => true,
                    _ => cmp() != Some(Ordering::Equal),
                },
                Op::Lt => cmp() == Some(Ordering::Less),
                Op::Gt => cmp() == Some(Ordering::Greater),
                Op::Le => matches!(cmp(), Some(Ordering::Less | Ordering::Equal)),
                Op::Ge => matches!(cmp(), Some(Ordering::Greater | Ordering::Equal)),
                Op::In | Op::NotIn => {
                    let hit = vals
                        .iter()
                        .any(|l| compare(&def, v.as_ref(), l, ctx) == Some(Ordering::Equal));
                    hit == (*op == Op::In)
                }
                Op::Contains | Op::NotContains => {
                    let needle = lit_text(first, ctx).to_lowercase();
                    let hay = v.as_ref().and_then(Value::as_str).unwrap_or("").to_lowercase();
                    let hit = if def.reference == crate::model::TAGS {
                        hay.split(';').any(|t| t.trim() == needle)
                    } else {
                        hay.contains(&needle)
                    };
                    hit == (*op == Op::Contains)
                }
                Op::Under => {
                    let hay = v.as_ref().and_then(Value::as_str).unwrap_or("").to_lowercase();
                    let root = lit_text(first, ctx).to_lowercase();
                    hay == root || hay.starts_with(&format!("{root}\\"))
                }
            }
        }
    }
}

/// Orders two items by the query's sort keys (then by id).
pub fn order(q: &Query, a: &dyn Fn(&str) -> Option<Value>, b: &dyn Fn(&str) -> Option<Value>, ctx: &Ctx) -> Ordering {
    for (f, desc) in &q.order {
        let Some(def) = (ctx.field)(f) else { continue };
        let (x, y) = (a(&def.reference), b(&def.reference));
        let o = match (x, y) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
            (Some(x), Some(y)) => match (x.as_f64(), y.as_f64()) {
                (Some(p), Some(q)) => p.partial_cmp(&q).unwrap_or(Ordering::Equal),
                _ => x
                    .as_str()
                    .unwrap_or("")
                    .to_lowercase()
                    .cmp(&y.as_str().unwrap_or("").to_lowercase()),
            },
        };
        let o = if *desc { o.reverse() } else { o };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_subset() {
        let q = parse(
            "SELECT [System.Id] FROM WorkItems WHERE [System.TeamProject] = @project AND \
             ([System.Tags] CONTAINS 'x' OR [System.State] IN ('New','Active')) AND \
             [System.ChangedDate] >= @today - 7 ORDER BY [System.ChangedDate] DESC",
        )
        .unwrap();
        assert_eq!(q.columns, vec!["System.Id"]);
        assert_eq!(q.order, vec![("System.ChangedDate".to_string(), true)]);
        assert!(matches!(q.filter, Some(Expr::And(..))));
        assert!(parse("SELECT [System.Id] FROM WorkItemLinks").is_err());
        assert!(parse("SELECT [System.Id] FROM WorkItems WHERE [System.Id] =").is_err());
        assert!(parse("SELECT [System.Id] FROM WorkItems WHERE [System.Title] = 'it''s'").is_ok());
    }
}
