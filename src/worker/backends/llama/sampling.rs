//! Per-request sampling for llama.cpp: checking a request's sampling parameters, building
//! its sampler chain (penalties, GBNF grammar, greedy or top-k/top-p/temperature and a
//! seeded pick), sampling by hand when a grammar is present (so that a grammar allowing no
//! token is an error rather than an abort), log-probabilities from a logits row, and a
//! readable reason when llama.cpp refuses a grammar. Each sequence of the scheduler owns
//! its own chain; nothing here knows about slots or batches.

use llama_cpp_2::GrammarError;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;

use super::super::{BackendError, GenerateParams, TokenLogprob, TopLogprob};
use super::DEFAULT_TEMPERATURE;

/// Most alternatives [`GenerateParams::logprobs`] may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u8 = 20;

pub(super) fn validate(params: &GenerateParams) -> Result<(), BackendError> {
    let bad = |m: String| Err(BackendError::BadRequest(m));
    if params.prompt.is_none() && params.messages.is_empty() {
        return bad("messages must not be empty".into());
    }
    if let Some(t) = params.temperature
        && !(t.is_finite() && t >= 0.0)
    {
        return bad(format!("temperature must be >= 0, got {t}"));
    }
    if let Some(p) = params.top_p
        && !(p.is_finite() && p > 0.0 && p <= 1.0)
    {
        return bad(format!("top_p must be in (0, 1], got {p}"));
    }
    if params.max_new_tokens == Some(0) {
        return bad("max_new_tokens must be at least 1".into());
    }
    for (name, v) in [
        ("presence_penalty", params.presence_penalty),
        ("frequency_penalty", params.frequency_penalty),
    ] {
        if let Some(v) = v
            && !(v.is_finite() && (-2.0..=2.0).contains(&v))
        {
            return bad(format!("{name} must be in [-2, 2], got {v}"));
        }
    }
    if let Some(k) = params.logprobs
        && k > MAX_TOP_LOGPROBS
    {
        return bad(format!(
            "logprobs must be in 0..={MAX_TOP_LOGPROBS} (alternatives per token), got {k}"
        ));
    }
    if let Some(g) = &params.grammar
        && g.trim().is_empty()
    {
        return bad("grammar must not be empty".into());
    }
    Ok(())
}

/// The sampling temperature a request runs at (`0` = greedy).
pub(super) fn effective_temperature(params: &GenerateParams) -> f32 {
    params.temperature.unwrap_or(DEFAULT_TEMPERATURE)
}

/// The seed of the `dist` sampler. llama.cpp treats `u32::MAX` as "pick a random seed",
/// so a caller's seed never maps to it (the fold of a `u64` seed would, for some seeds).
pub(crate) fn sampler_seed(seed: Option<u64>) -> u32 {
    match seed {
        Some(s) => match (s ^ (s >> 32)) as u32 {
            u32::MAX => u32::MAX - 1,
            folded => folded,
        },
        None => rand::random::<u32>(),
    }
}

/// The sampler chain: penalties, then the grammar (so that every later stage, and the final
/// pick, only sees tokens the grammar allows: a top-k cut before the grammar could leave no
/// allowed token), then greedy, or top-k, top-p, temperature and a seeded random pick.
pub(super) fn build_sampler(
    params: &GenerateParams,
    grammar: Option<LlamaSampler>,
    n_vocab: i32,
    n_ctx: u32,
) -> LlamaSampler {
    let mut chain = Vec::new();
    let freq = params.frequency_penalty.unwrap_or(0.0);
    let presence = params.presence_penalty.unwrap_or(0.0);
    if freq != 0.0 || presence != 0.0 {
        // The sampler sees only generated tokens (prompt tokens are not
        // accepted into it), like OpenAI's penalties.
        chain.push(LlamaSampler::penalties(
            n_vocab,
            n_ctx as i32,
            1.0,
            freq,
            presence,
        ));
    }
    chain.extend(grammar);
    let temperature = effective_temperature(params);
    if temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if let Some(k) = params.top_k.filter(|k| *k > 0) {
            chain.push(LlamaSampler::top_k(k));
        }
        if let Some(p) = params.top_p.filter(|p| *p < 1.0) {
            chain.push(LlamaSampler::top_p(p, 1));
        }
        chain.push(LlamaSampler::temp(temperature));
        chain.push(LlamaSampler::dist(sampler_seed(params.seed)));
    }
    LlamaSampler::chain_simple(chain)
}

/// Sample one token through a chain that holds a grammar, by hand rather than with
/// `LlamaSampler::sample`: llama.cpp aborts the process (C++ exception or `GGML_ABORT`)
/// when a grammar is made to accept a token it forbids, which `sample` would do when the
/// grammar allows no token at all. Here that case is an error, and the token is accepted
/// through the exception-catching `try_accept`. `buf` is reused between tokens.
pub(super) fn sample_with_grammar(
    sampler: &mut LlamaSampler,
    logits: &[f32],
    buf: &mut Vec<LlamaTokenData>,
) -> Result<LlamaToken, BackendError> {
    buf.clear();
    buf.extend(
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
    );
    let mut candidates = LlamaTokenDataArray::new(std::mem::take(buf), false);
    sampler.apply(&mut candidates);
    let chosen = candidates
        .selected
        .and_then(|i| candidates.data.get(i))
        .filter(|d| d.logit() > f32::NEG_INFINITY)
        .map(|d| d.id());
    *buf = candidates.data;
    let token = chosen.ok_or_else(|| {
        BackendError::BadRequest(
            "grammar: no token the model can produce fits the grammar at this point \
             (does it require a character the vocabulary cannot spell?)"
                .into(),
        )
    })?;
    sampler
        .try_accept(token)
        .map_err(|e| BackendError::internal(format!("grammar sampler failed: {e}")))?;
    Ok(token)
}

/// Log-probabilities at one position, from the model's logits row.
///
/// A log-softmax over the whole vocabulary of `logits / temperature` (plain logits when
/// greedy): the model's own distribution at the request's temperature, before penalties,
/// top-k, top-p and the grammar. The chosen token's text and bytes are its piece as it
/// appears in the generated text (`piece`); alternatives are rendered with special tokens
/// spelled out (an end-of-turn alternative reads `<|im_end|>`, not an empty string).
pub(super) fn token_logprob(
    vocab: &llama_cpp_2::vocab::LlamaVocab<'_>,
    logits: &[f32],
    token: LlamaToken,
    piece: &[u8],
    temperature: f32,
    k: usize,
) -> TokenLogprob {
    let scale = if temperature > 0.0 {
        1.0 / temperature
    } else {
        1.0
    };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .map(|&l| f64::from(((l - max) * scale).exp()))
        .sum();
    let log_z = max * scale + sum.ln() as f32;
    // Rounding can put the most likely token a hair above 0.
    let logprob_of = |l: f32| (l * scale - log_z).min(0.0);
    let chosen = logits
        .get(token.0 as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);

    // The k largest logits, largest first (ties: lower token id first).
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() == k && l <= best[k - 1].0 {
                continue;
            }
            let at = best.partition_point(|&(v, _)| v >= l);
            best.insert(at, (l, i));
            best.truncate(k);
        }
    }
    let top = best
        .into_iter()
        .map(|(l, i)| {
            let bytes = vocab.token_to_piece(LlamaToken(i as i32), true, None);
            TopLogprob {
                token: String::from_utf8_lossy(&bytes).into_owned(),
                bytes,
                logprob: logprob_of(l),
            }
        })
        .collect();
    TokenLogprob {
        token: String::from_utf8_lossy(piece).into_owned(),
        bytes: piece.to_vec(),
        logprob: logprob_of(chosen),
        top,
    }
}

/// Why llama.cpp rejected a GBNF grammar, as far as a light scan can tell (llama.cpp's
/// parser prints its own reason only to stderr). Called only after llama.cpp has refused
/// the grammar, so a miss here never rejects a grammar llama.cpp accepts. `None` when the
/// scan finds nothing wrong.
pub(crate) fn explain_grammar_error(gbnf: &str) -> Option<String> {
    struct Name {
        text: String,
        line: usize,
        defines: bool,
    }
    let mut names: Vec<Name> = Vec::new();
    let mut prev_was_name = false;
    let mut depth = 0usize;
    let mut open_line = 0;
    let mut chars = gbnf.chars().peekable();
    let (mut line, mut col) = (1usize, 0usize);
    while let Some(c) = chars.next() {
        col += 1;
        let at = format!("line {line}, column {col}");
        let mut is_name = false;
        match c {
            '\n' => {
                line += 1;
                col = 0;
            }
            ' ' | '\t' | '\r' => {}
            '#' => while chars.next_if(|&c| c != '\n').is_some() {},
            '"' | '[' => {
                let close = if c == '"' { '"' } else { ']' };
                let mut closed = false;
                while let Some(d) = chars.next() {
                    col += 1;
                    if d == '\n' {
                        line += 1;
                        col = 0;
                    }
                    if d == '\\' {
                        chars.next();
                        col += 1;
                    } else if d == close {
                        closed = true;
                        break;
                    }
                }
                if !closed {
                    let what = if c == '"' {
                        "string"
                    } else {
                        "character class"
                    };
                    return Some(format!("unterminated {what} starting at {at}"));
                }
            }
            '<' => {
                if !chars.any(|d| d == '>') {
                    return Some(format!("unterminated token reference `<` at {at}"));
                }
            }
            '{' => {
                if !chars.any(|d| d == '}') {
                    return Some(format!("unterminated repetition `{{` at {at}"));
                }
            }
            ':' => {
                if !(chars.next_if_eq(&':').is_some() && chars.next_if_eq(&'=').is_some()) {
                    return Some(format!(
                        "unexpected `:` at {at} (a rule is written `name ::= ...`)"
                    ));
                }
                if !prev_was_name {
                    return Some(format!("`::=` at {at} does not follow a rule name"));
                }
                if let Some(last) = names.last_mut() {
                    last.defines = true;
                }
            }
            '(' => {
                if depth == 0 {
                    open_line = line;
                }
                depth += 1;
            }
            ')' => {
                if depth == 0 {
                    return Some(format!("unmatched `)` at {at}"));
                }
                depth -= 1;
            }
            '|' | '*' | '+' | '?' | '.' | '!' => {}
            '_' => {
                return Some(format!(
                    "`_` at {at}: rule names may contain only letters, digits and `-`"
                ));
            }
            c if c.is_ascii_alphanumeric() || c == '-' => {
                let mut text = String::from(c);
                while let Some(d) = chars.next_if(|d| d.is_ascii_alphanumeric() || *d == '-') {
                    text.push(d);
                    col += 1;
                }
                if let Some(&'_') = chars.peek() {
                    return Some(format!(
                        "`_` after `{text}` at line {line}: rule names may contain only \
                         letters, digits and `-`"
                    ));
                }
                names.push(Name {
                    text,
                    line,
                    defines: false,
                });
                is_name = true;
            }
            other => {
                return Some(format!("unexpected character {other:?} at {at}"));
            }
        }
        if !matches!(c, ' ' | '\t' | '\r') {
            prev_was_name = is_name;
        }
    }
    if depth > 0 {
        return Some(format!("unclosed `(` opened on line {open_line}"));
    }
    let defined: std::collections::HashSet<&str> = names
        .iter()
        .filter(|n| n.defines)
        .map(|n| n.text.as_str())
        .collect();
    if defined.is_empty() {
        return Some("no rules (a grammar is lines of the form `name ::= ...`)".into());
    }
    if !defined.contains("root") {
        return Some("no `root` rule (generation starts from the rule named `root`)".into());
    }
    if let Some(n) = names
        .iter()
        .find(|n| !n.defines && !defined.contains(n.text.as_str()))
    {
        return Some(format!(
            "rule `{}` (line {}) is used but never defined",
            n.text, n.line
        ));
    }
    None
}

/// The grammar sampler for a request's GBNF grammar (root rule `root`), or the reason the
/// grammar is invalid. Each sequence gets its own (grammar state is the position reached in
/// the grammar).
pub(super) fn grammar_sampler(
    model: &LlamaModel,
    gbnf: &str,
) -> Result<LlamaSampler, BackendError> {
    LlamaSampler::grammar(model, gbnf, "root").map_err(|e| {
        let reason = match e {
            GrammarError::GrammarNullBytes => "it contains a NUL byte".to_string(),
            _ => explain_grammar_error(gbnf).unwrap_or_else(|| {
                "llama.cpp could not parse it (a syntax error, or left recursion; \
                 llama.cpp prints the details on the worker's stderr)"
                    .to_string()
            }),
        };
        BackendError::BadRequest(format!("invalid grammar: {reason}"))
    })
}
