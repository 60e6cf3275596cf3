//! Instruction data for training: JSONL in Alpaca form (`instruction`, optional `input`,
//! `output`) or chat form (`messages` with roles), rendered through the model's chat template
//! or a named prompt template, tokenised with a loss mask on the response tokens only,
//! truncated, and packed into rows with each example's positions and segment kept apart.

use std::ops::Range;
use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::tokenizer::{Message, Tokenizer};

/// One line of a training file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    Chat {
        messages: Vec<Message>,
    },
    Alpaca {
        instruction: String,
        #[serde(default)]
        input: Option<String>,
        output: String,
    },
}

impl Record {
    /// As chat messages (Alpaca: the instruction and input as the user turn).
    pub fn messages(&self) -> Vec<Message> {
        match self {
            Record::Chat { messages } => messages.clone(),
            Record::Alpaca {
                instruction,
                input,
                output,
            } => {
                let user = match input.as_deref().filter(|s| !s.trim().is_empty()) {
                    Some(inp) => format!("{instruction}\n\n{inp}"),
                    None => instruction.clone(),
                };
                vec![
                    Message::user(user),
                    Message {
                        role: "assistant".into(),
                        content: output.clone(),
                    },
                ]
            }
        }
    }
}

/// How records become text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromptTemplate {
    /// The model's own chat template (instruct models).
    Chat,
    /// The Stanford Alpaca prompt, for base models without a chat template.
    Alpaca,
}

impl PromptTemplate {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "chat" => Ok(Self::Chat),
            "alpaca" => Ok(Self::Alpaca),
            _ => Err(Error::Setting(format!(
                "unknown prompt template `{s}` (chat, alpaca)"
            ))),
        }
    }

    /// The model's chat template when it has one, else Alpaca.
    pub fn for_tokenizer(t: &Tokenizer) -> Self {
        if t.chat_template.is_some() {
            Self::Chat
        } else {
            Self::Alpaca
        }
    }
}

/// Read a JSONL file of records; errors name the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec: Record = serde_json::from_str(line).map_err(|e| Error::Malformed {
            path: path.into(),
            what: format!(
                "line {}: not an Alpaca (instruction, input, output) or chat (messages) record: {e}",
                i + 1
            ),
        })?;
        if let Record::Chat { messages } = &rec
            && !messages.iter().any(|m| m.role == "assistant")
        {
            return Err(Error::Malformed {
                path: path.into(),
                what: format!("line {}: no assistant message to learn from", i + 1),
            });
        }
        out.push(rec);
    }
    if out.is_empty() {
        return Err(Error::Malformed {
            path: path.into(),
            what: "no records".into(),
        });
    }
    Ok(out)
}

/// A tokenised example: `loss_mask[i]` says whether token i is a response token the model is
/// trained to predict.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl Example {
    /// Tokens whose prediction is trained (a response token that has a token before it).
    pub fn targets(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|m| **m).count()
    }
}

const ALPACA_HEADER: &str = "Below is an instruction that describes a task. Write a response that \
                             appropriately completes the request.\n\n";

/// Tokenise one record; truncated to `max_len` tokens. `None` when nothing trainable remains
/// (the prompt alone fills `max_len`).
pub fn tokenize(
    rec: &Record,
    tok: &Tokenizer,
    template: PromptTemplate,
    max_len: usize,
) -> Result<Option<Example>> {
    let messages = rec.messages();
    let mut ex = Example {
        tokens: vec![],
        loss_mask: vec![],
    };
    let push = |ex: &mut Example, text: &str, train: bool| -> Result<()> {
        let ids = tok.encode(text, ex.tokens.is_empty())?;
        ex.loss_mask.extend(std::iter::repeat_n(train, ids.len()));
        ex.tokens.extend(ids);
        Ok(())
    };
    match template {
        PromptTemplate::Chat => {
            // Render growing prefixes and take each new piece: an assistant turn's text is what
            // the template adds for it after the generation prompt.
            let mut done = String::new();
            for i in 0..messages.len() {
                let upto = &messages[..=i];
                if messages[i].role == "assistant" {
                    let prompt = tok.apply_chat_template(&messages[..i], true)?;
                    let full = tok.apply_chat_template(upto, false)?;
                    let (Some(p), Some(r)) =
                        (prompt.strip_prefix(&done), full.strip_prefix(&prompt))
                    else {
                        return Err(Error::ChatTemplate(
                            "the template does not render conversations prefix by prefix; use \
                             --template alpaca"
                                .into(),
                        ));
                    };
                    push(&mut ex, p, false)?;
                    push(&mut ex, r, true)?;
                    done = full;
                } else if i + 1 == messages.len() {
                    break;
                }
            }
        }
        PromptTemplate::Alpaca => {
            let mut prompt = ALPACA_HEADER.to_string();
            for m in &messages {
                if m.role == "assistant" {
                    push(&mut ex, &format!("{prompt}### Response:\n"), false)?;
                    prompt.clear();
                    push(&mut ex, &m.content, true)?;
                    let eos = tok.eos_token_ids.first().copied();
                    ex.tokens.extend(eos);
                    ex.loss_mask.extend(eos.map(|_| true));
                    prompt.push_str("\n\n");
                } else {
                    let head = if m.role == "system" {
                        ""
                    } else {
                        "### Instruction:\n"
                    };
                    prompt.push_str(&format!("{head}{}\n\n", m.content));
                }
            }
        }
    }
    ex.tokens.truncate(max_len);
    ex.loss_mask.truncate(max_len);
    Ok((ex.targets() > 0).then_some(ex))
}

/// Rows of packed examples, each at most `max_len` tokens.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Row {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    pub segments: Vec<u32>,
    /// `parents[s]`: the segment whose tokens segment `s` also sees, a prefix it shares with
    /// other examples ([`pack_shared`]). Empty, or `None`, when a segment sees only itself.
    pub parents: Vec<Option<u32>>,
    /// `labels[i]`: the token position i is trained to predict, if any.
    pub labels: Vec<Option<u32>>,
}

impl Row {
    pub fn targets(&self) -> usize {
        self.labels.iter().filter(|l| l.is_some()).count()
    }

    /// Append `ex.tokens[span]` as a new segment that also sees `parent`, at their positions in
    /// `ex`, each labelled with the next token when that one is trained on; returns its id.
    fn push_segment(&mut self, ex: &Example, span: Range<usize>, parent: Option<u32>) -> u32 {
        let seg = self.parents.len() as u32;
        self.parents.push(parent);
        let n = ex.tokens.len();
        for i in span {
            self.tokens.push(ex.tokens[i]);
            self.positions.push(i);
            self.segments.push(seg);
            self.labels
                .push((i + 1 < n && ex.loss_mask[i + 1]).then(|| ex.tokens[i + 1]));
        }
        seg
    }
}

/// Pack examples in order into rows of at most `max_len` tokens (first fit in order: an example
/// starts a new row when it does not fit). With `pack` false, one example per row.
pub fn pack(examples: &[Example], max_len: usize, pack: bool) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let mut cur: Option<Row> = None;
    for ex in examples {
        let n = ex.tokens.len();
        let fits = cur
            .as_ref()
            .is_some_and(|r| pack && r.tokens.len() + n <= max_len);
        if !fits {
            rows.extend(cur.take());
            cur = Some(Row::default());
        }
        let Some(row) = cur.as_mut() else { continue };
        row.push_segment(ex, 0..n, None);
    }
    rows.extend(cur);
    rows
}

/// Pack groups of examples that begin alike (one program at several input sizes) into rows of
/// at most `max_len` tokens, each group's common prefix once: the prefix is a segment of its
/// own, and each example's rest a segment that sees it ([`Row::parents`]) and continues its
/// positions. Attention, positions and labels are those of the examples packed apart, so the
/// loss is the same, for the prefix's compute once instead of once per example. A prefix never
/// reaches a labelled token; groups whose examples share fewer than [`MIN_SHARED`] tokens, and
/// single examples, are packed as [`pack`] packs them. Units (a prefix with the rests that fit
/// beside it, or one example) fill rows first fit in order.
pub fn pack_shared(groups: &[Vec<Example>], max_len: usize) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let mut cur = Row::default();
    for group in groups {
        for (prefix, rests) in shared_units(group, max_len) {
            let len = prefix + rests.iter().map(|e| e.tokens.len() - prefix).sum::<usize>();
            if !cur.tokens.is_empty() && cur.tokens.len() + len > max_len {
                rows.push(std::mem::take(&mut cur));
            }
            let parent = (prefix > 0).then(|| cur.push_segment(rests[0], 0..prefix, None));
            for ex in rests {
                cur.push_segment(ex, prefix..ex.tokens.len(), parent);
            }
        }
    }
    if !cur.tokens.is_empty() {
        rows.push(cur);
    }
    rows
}

/// Fewer shared tokens than this are not worth a segment of their own.
pub const MIN_SHARED: usize = 16;

/// A group cut into units of (prefix length, examples): the group's common prefix, up to
/// before its first labelled token, with as many examples' rests as fit in `max_len` beside it.
fn shared_units(group: &[Example], max_len: usize) -> Vec<(usize, Vec<&Example>)> {
    let Some(first) = group.first() else {
        return vec![];
    };
    // A token's label is the next token's when that one is trained on, so the prefix must
    // stop before the token ahead of the first trained one.
    let mut prefix = group
        .iter()
        .map(|e| {
            e.loss_mask
                .iter()
                .position(|&m| m)
                .unwrap_or(e.tokens.len())
        })
        .min()
        .unwrap_or(0)
        .saturating_sub(1);
    for e in &group[1..] {
        prefix = prefix.min(
            first
                .tokens
                .iter()
                .zip(&e.tokens)
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    if group.len() < 2 || prefix < MIN_SHARED {
        return group.iter().map(|e| (0, vec![e])).collect();
    }
    let mut units: Vec<(usize, Vec<&Example>)> = Vec::new();
    let mut len = 0;
    for e in group {
        let rest = e.tokens.len() - prefix;
        if units.is_empty() || len + rest > max_len {
            units.push((prefix, vec![]));
            len = prefix;
        }
        len += rest;
        if let Some(u) = units.last_mut() {
            u.1.push(e);
        }
    }
    units
}

/// Split records into (train, validation): a seeded shuffle, `frac` of them (at least one when
/// there are two or more) held out.
pub fn split(records: Vec<Record>, frac: f64, seed: u64) -> (Vec<Record>, Vec<Record>) {
    if frac <= 0.0 || records.len() < 2 {
        return (records, vec![]);
    }
    let mut idx: Vec<usize> = (0..records.len()).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    let n_val = ((records.len() as f64 * frac).round() as usize).clamp(1, records.len() - 1);
    let val_set: std::collections::HashSet<usize> = idx[..n_val].iter().copied().collect();
    let mut train = Vec::new();
    let mut val = Vec::new();
    for (i, r) in records.into_iter().enumerate() {
        if val_set.contains(&i) {
            val.push(r);
        } else {
            train.push(r);
        }
    }
    (train, val)
}

/// Training and validation rows, ready for [`train`](super::train).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub train: Vec<Row>,
    pub val: Vec<Row>,
    pub train_records: usize,
    pub val_records: usize,
    /// Training records with no response left within `max_len`.
    pub dropped: usize,
}

/// Where the data is and how to cut it.
#[derive(Debug, Clone)]
pub struct DataSpec<'a> {
    /// A JSONL file, or a dataset folder `codelsi import` wrote (its `train.jsonl`, and its
    /// `val.jsonl` as validation data unless `val` is given).
    pub data: &'a Path,
    pub val: Option<&'a Path>,
    /// Without validation data, this share of the training records is held out.
    pub val_frac: f64,
    pub seed: u64,
    pub template: PromptTemplate,
    pub max_len: usize,
    /// Pack short examples together (else one example per row).
    pub pack: bool,
}

/// Read, split, tokenise and pack the data.
pub fn prepare(spec: &DataSpec<'_>, tokenizer: &Tokenizer) -> Result<Prepared> {
    if spec.max_len < 8 {
        return Err(Error::Setting(
            "the row length (max_len) must be at least 8 tokens".into(),
        ));
    }
    let (train_file, dataset_val) = crate::dataset::DatasetDir::files(spec.data);
    let records = read_jsonl(&train_file)?;
    let (train_records, val_records) = match spec.val.map(Path::to_path_buf).or(dataset_val) {
        Some(v) => (records, read_jsonl(&v)?),
        None => split(records, spec.val_frac, spec.seed),
    };
    let rows = |records: &[Record]| -> Result<(Vec<Row>, usize)> {
        let mut examples = Vec::with_capacity(records.len());
        let mut dropped = 0;
        for r in records {
            match tokenize(r, tokenizer, spec.template, spec.max_len)? {
                Some(e) => examples.push(e),
                None => dropped += 1,
            }
        }
        Ok((pack(&examples, spec.max_len, spec.pack), dropped))
    };
    let (train, dropped) = rows(&train_records)?;
    let (val, _) = rows(&val_records)?;
    if train.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "no training example has a response left within {} tokens",
            spec.max_len
        )));
    }
    Ok(Prepared {
        train,
        val,
        train_records: train_records.len(),
        val_records: val_records.len(),
        dropped,
    })
}
