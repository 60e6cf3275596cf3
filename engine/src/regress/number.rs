//! Numbers as tokens: a normalisation-free decimal encoding after regress-lm's P10 scheme
//! ("Regression Language Models for Code"; google-deepmind/regress-lm `tokenizers.py`).
//!
//! A number is [`TOKENS_PER_NUMBER`] tokens: a sign, a decimal exponent, then
//! [`MANTISSA_DIGITS`] mantissa digits, the value being `±d₁.d₂d₃d₄ × 10^e` with
//! `e` in [`EXP_MIN`]..=[`EXP_MAX`]. P10 writes the exponent last; here it comes right after the
//! sign, so the first choice the model makes is the order of magnitude (the one that matters
//! most for costs spanning several decades) and the digits are decided knowing it.
//!
//! The [`NUM_TOKENS`] number tokens are new tokens appended after the base model's vocabulary
//! (ids `vocab + index`); their embedding and output rows train with the adapter. The grammar
//! is fixed by the position inside a number, so decoding is constrained by a mask per position
//! ([`class_at`]).

use std::ops::Range;

use crate::error::{Error, Result};

pub const MANTISSA_DIGITS: usize = 4;
pub const EXP_MIN: i32 = -10;
pub const EXP_MAX: i32 = 10;
/// Sign, exponent, mantissa digits.
pub const TOKENS_PER_NUMBER: usize = 2 + MANTISSA_DIGITS;
const SIGNS: usize = 2;
const DIGITS: usize = 10;
const EXPONENTS: usize = (EXP_MAX - EXP_MIN + 1) as usize;
/// Number tokens: `+ -`, `0`…`9`, `E-10`…`E10`.
pub const NUM_TOKENS: usize = SIGNS + DIGITS + EXPONENTS;

/// What a position of a number holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Sign,
    Exponent,
    Digit,
}

impl Class {
    /// The number tokens (indices into the [`NUM_TOKENS`]) of this class.
    pub fn tokens(self) -> Range<usize> {
        match self {
            Class::Sign => 0..SIGNS,
            Class::Digit => SIGNS..SIGNS + DIGITS,
            Class::Exponent => SIGNS + DIGITS..NUM_TOKENS,
        }
    }

    /// The class of number token `index`.
    pub fn of(index: usize) -> Class {
        if index < SIGNS {
            Class::Sign
        } else if index < SIGNS + DIGITS {
            Class::Digit
        } else {
            Class::Exponent
        }
    }
}

/// The class of position `pos` of a sequence of numbers.
pub fn class_at(pos: usize) -> Class {
    match pos % TOKENS_PER_NUMBER {
        0 => Class::Sign,
        1 => Class::Exponent,
        _ => Class::Digit,
    }
}

/// A number token's text, for display: `<+>`, `<7>`, `<E-3>`.
pub fn token_text(index: usize) -> String {
    match Class::of(index) {
        Class::Sign => if index == 0 { "<+>" } else { "<->" }.into(),
        Class::Digit => format!("<{}>", index - SIGNS),
        Class::Exponent => format!("<E{}>", exponent_of(index)),
    }
}

/// A text for each number token that the base tokenizer knows, whose embedding starts the new
/// token's rows: the sign, the digit, and `e-3` for an exponent.
pub fn token_seed_text(index: usize) -> String {
    match Class::of(index) {
        Class::Sign => if index == 0 { "+" } else { "-" }.into(),
        Class::Digit => (index - SIGNS).to_string(),
        Class::Exponent => format!("e{}", exponent_of(index)),
    }
}

fn exponent_of(index: usize) -> i32 {
    (index - SIGNS - DIGITS) as i32 + EXP_MIN
}

fn exponent_token(e: i32) -> usize {
    SIGNS + DIGITS + (e - EXP_MIN) as usize
}

/// The tokens of `value`. Magnitudes above the largest number clamp to it; those below
/// `10^EXP_MIN` (and zero) become zero. Not-a-number is refused.
pub fn encode(value: f64) -> Result<[usize; TOKENS_PER_NUMBER]> {
    if !value.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "{value} cannot be encoded as a number"
        )));
    }
    let sign = usize::from(value < 0.0);
    let a = value.abs();
    let scale = 10f64.powi(MANTISSA_DIGITS as i32 - 1);
    let (mut e, mut m) = if a < 10f64.powi(EXP_MIN) {
        (EXP_MIN, 0u64)
    } else {
        let e = a.log10().floor() as i32;
        (e, (a / 10f64.powi(e) * scale).round() as u64)
    };
    // Rounding can carry into a fifth digit (9.9996 → 10.000), and log10 can be off by one
    // at exact powers of ten.
    if m >= 10 * scale as u64 {
        m /= 10;
        e += 1;
    } else if m > 0 && m < scale as u64 {
        m *= 10;
        e -= 1;
    }
    if e > EXP_MAX {
        (e, m) = (EXP_MAX, 10 * scale as u64 - 1);
    }
    if e < EXP_MIN {
        (e, m) = (EXP_MIN, 0);
    }
    let mut out = [0; TOKENS_PER_NUMBER];
    out[0] = sign;
    out[1] = exponent_token(e);
    for i in 0..MANTISSA_DIGITS {
        let digit = (m / 10u64.pow((MANTISSA_DIGITS - 1 - i) as u32)) % 10;
        out[2 + i] = SIGNS + digit as usize;
    }
    Ok(out)
}

/// The value of one number's tokens; an error when they break the grammar.
pub fn decode(tokens: &[usize]) -> Result<f64> {
    if tokens.len() != TOKENS_PER_NUMBER {
        return Err(Error::Internal(format!(
            "a number is {TOKENS_PER_NUMBER} tokens, not {}",
            tokens.len()
        )));
    }
    for (pos, &t) in tokens.iter().enumerate() {
        if t >= NUM_TOKENS || Class::of(t) != class_at(pos) {
            return Err(Error::Internal(format!(
                "token {t} cannot stand at position {pos} of a number"
            )));
        }
    }
    let mut m = 0u64;
    for &t in &tokens[2..] {
        m = m * 10 + (t - SIGNS) as u64;
    }
    let e = exponent_of(tokens[1]);
    let v = m as f64 * 10f64.powi(e - (MANTISSA_DIGITS as i32 - 1));
    Ok(if tokens[0] == 1 { -v } else { v })
}

/// The text of a number's tokens, for display and debugging.
pub fn tokens_text(tokens: &[usize]) -> String {
    tokens.iter().map(|&t| token_text(t)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(v: f64) -> f64 {
        decode(&encode(v).unwrap_or_else(|e| panic!("{e}"))).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn round_trips_within_the_mantissa() {
        for v in [
            1.0, 12.34, 0.001234, 98765.0, -3.5, 9.99951, 1e-10, 7.0e9, 100.0, 0.1,
        ] {
            let got = round_trip(v);
            let rel = ((got - v) / v).abs();
            assert!(rel <= 5e-4, "{v} came back as {got}");
        }
        assert_eq!(round_trip(0.0), 0.0);
        assert_eq!(round_trip(1e-12), 0.0);
        assert_eq!(round_trip(1e15), 9.999e10);
        assert_eq!(
            tokens_text(&encode(-12.34).unwrap_or_else(|e| panic!("{e}"))),
            "<-><E1><1><2><3><4>"
        );
        assert!(encode(f64::NAN).is_err());
    }

    #[test]
    fn grammar_is_checked() {
        let mut t = encode(5.0).unwrap_or_else(|e| panic!("{e}"));
        assert!(decode(&t).is_ok());
        t.swap(1, 2);
        assert!(decode(&t).is_err());
        assert!(decode(&t[..3]).is_err());
        for pos in 0..2 * TOKENS_PER_NUMBER {
            for tok in class_at(pos).tokens() {
                assert_eq!(Class::of(tok), class_at(pos));
            }
        }
    }
}
