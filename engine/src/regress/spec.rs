//! What a regression adapter predicts and how its prompts and answers are laid out as rows.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Example;
use super::number::{self, TOKENS_PER_NUMBER};
use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;
use crate::train::data::{Example as TokenExample, Row, pack_shared};
use crate::train::meta::AdapterMeta;

/// What a regression adapter predicts and how its prompts are cut; kept in the adapter's
/// `codelsi_adapter.json` under `extra.regression`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegressionSpec {
    /// In the order of the answer.
    pub metrics: Vec<String>,
    /// The prompt's length limit in tokens (the code is cut in the middle to fit).
    pub max_prompt_tokens: usize,
    /// The base vocabulary size: number token `i` is id `vocab + i`.
    pub vocab: usize,
    /// The number encoding, for readers of the file.
    pub encoding: String,
}

impl RegressionSpec {
    pub fn new(metrics: Vec<String>, max_prompt_tokens: usize, vocab: usize) -> Self {
        Self {
            metrics,
            max_prompt_tokens,
            vocab,
            encoding: format!(
                "sign, exponent E{}..E{}, {} mantissa digits",
                number::EXP_MIN,
                number::EXP_MAX,
                number::MANTISSA_DIGITS
            ),
        }
    }

    /// The spec of the adapter in `dir`; `None` when it is not a regression adapter.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let Some(meta) = AdapterMeta::read(dir)? else {
            return Ok(None);
        };
        match meta.extra.regression {
            None => Ok(None),
            Some(r) => serde_json::from_value(r)
                .map(Some)
                .map_err(|source| Error::Json {
                    path: dir.join(AdapterMeta::FILE),
                    source,
                }),
        }
    }

    /// The prompt's tokens: a header, the code (its middle cut out when the whole would pass
    /// `max_prompt_tokens`), and the metrics asked for. Pieces are tokenised apart, in training
    /// and prediction alike.
    pub fn prompt_tokens(&self, tok: &Tokenizer, code: &str) -> Result<Vec<u32>> {
        let head = tok.encode(
            "Predict the cost of running this program.\nProgram:\n",
            true,
        )?;
        let tail = tok.encode(
            &format!("\nMetrics: {}\nValues:", self.metrics.join(", ")),
            false,
        )?;
        let code_ids = tok.encode(code, false)?;
        let room = self
            .max_prompt_tokens
            .saturating_sub(head.len() + tail.len());
        if room < 16 {
            return Err(Error::InvalidArgument(format!(
                "a prompt of {} tokens leaves no room for code (the header takes {})",
                self.max_prompt_tokens,
                head.len() + tail.len()
            )));
        }
        let mut out = head;
        if code_ids.len() <= room {
            out.extend(code_ids);
        } else {
            let cut = tok.encode("\n…\n", false)?;
            let keep = room.saturating_sub(cut.len());
            let front = keep / 2;
            out.extend(&code_ids[..front]);
            out.extend(cut);
            out.extend(&code_ids[code_ids.len() - (keep - front)..]);
        }
        out.extend(tail);
        Ok(out)
    }

    /// The answer's token ids for `values`, one per metric.
    pub fn answer_tokens(&self, values: &[f64]) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(values.len() * TOKENS_PER_NUMBER);
        for &v in values {
            out.extend(number::encode(v)?.iter().map(|&t| (self.vocab + t) as u32));
        }
        Ok(out)
    }

    /// Training rows: prompt then answer, the loss on the answer; examples missing a metric
    /// are left out (their count is returned). The examples of a group (one program at several
    /// sizes) share the start of their prompts, which is packed once ([`pack_shared`]): on
    /// `codelsi measure` data that is about 2.4 times less text to run.
    pub fn rows(&self, examples: &[Example], tok: &Tokenizer) -> Result<(Vec<Row>, usize)> {
        let mut groups: Vec<Vec<TokenExample>> = Vec::new();
        let mut group_of: BTreeMap<&str, usize> = BTreeMap::new();
        let mut missing = 0;
        for e in examples {
            let values: Option<Vec<f64>> = self
                .metrics
                .iter()
                .map(|m| e.metrics.get(m).copied().filter(|v| v.is_finite()))
                .collect();
            let Some(values) = values else {
                missing += 1;
                continue;
            };
            let mut tokens = self.prompt_tokens(tok, &e.code)?;
            let prompt_len = tokens.len();
            tokens.extend(self.answer_tokens(&values)?);
            let loss_mask = (0..tokens.len()).map(|i| i >= prompt_len).collect();
            let ex = TokenExample { tokens, loss_mask };
            match e.group.as_deref() {
                Some(g) => match group_of.get(g) {
                    Some(&k) => groups[k].push(ex),
                    None => {
                        group_of.insert(g, groups.len());
                        groups.push(vec![ex]);
                    }
                },
                None => groups.push(vec![ex]),
            }
        }
        let row_len = self.max_prompt_tokens + self.metrics.len() * TOKENS_PER_NUMBER;
        Ok((pack_shared(&groups, row_len), missing))
    }
}
