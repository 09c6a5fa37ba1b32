//! Continuing a final assistant message (`continue_final_message: true`): the conversation
//! before it rendered with the assistant's turn opened, then its text appended without an
//! end-of-turn, so the model goes on where the text stops.
//!
//! The apiserver sends such a request to continue a stream whose worker died
//! ([`crate::openai::continuation`]), with `x_dbgpt_continuation: true`: the final message
//! then counts as output already generated (against `max_tokens`, in
//! `usage.completion_tokens`), and with greedy decoding the continuation must give the text
//! an uninterrupted run would have. Re-tokenizing a text need not give back the tokens that
//! produced it (a word cut in its middle, a merge across the cut), so for a greedy request
//! the text is cut back to a safe boundary (before the last space-led word; nothing, for a
//! short text without one), the model generates the cut tail again, and that tail is checked
//! and dropped from the answer. Should the model depart from the tail, the generation is
//! dropped and the request runs again continuing the whole text (best effort). Without
//! `x_dbgpt_continuation` the final message is continued as vLLM does: as prompt, whole.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;

use crate::worker::backends::{
    BackendError, FinishReason, GenerateEvent, GenerateParams, LlmBackend, Usage,
};

/// How far back (bytes) a safe cut is looked for; a text with no cut in its last this many
/// bytes is continued whole.
const CUT_WINDOW: usize = 256;

/// Where to cut `text` so the part before re-tokenizes as it was generated: before its last
/// word led by a space (a space after a non-space, before a letter or digit: where every
/// BPE pre-tokenizer starts a token). 0 for a short text without such a place (generated
/// again whole); `text.len()` (no cut) for a long one.
pub(super) fn safe_cut(text: &str) -> usize {
    let b = text.as_bytes();
    let floor = b.len().saturating_sub(CUT_WINDOW);
    for i in (floor.max(1)..b.len()).rev() {
        if b[i] == b' '
            && !b[i - 1].is_ascii_whitespace()
            && text[i + 1..]
                .chars()
                .next()
                .is_some_and(char::is_alphanumeric)
        {
            return i;
        }
    }
    if b.len() <= CUT_WINDOW { 0 } else { b.len() }
}

/// What a continuation's generation does beyond the backend's (see [`generate`]).
#[derive(Clone)]
pub(super) struct Resume {
    /// The cut tail of the final message: generated again, checked and dropped.
    overlap: String,
    /// Tokens of the final message in the prompt, counted as generated.
    counted: u32,
    /// The request continuing the whole final message, and its count, taken should the
    /// model depart from `overlap`.
    fallback: Option<(GenerateParams, u32)>,
}

/// The generation parameters (and the [`Resume`], when the final message counts as
/// generated) of a continuation of `partial` after the `rendered` prompt. `base` holds the
/// request's sampling; its `max_new_tokens` is the request's `max_tokens`.
pub(super) fn plan(
    backend: &dyn LlmBackend,
    base: &GenerateParams,
    rendered: &str,
    partial: &str,
    as_generated: bool,
) -> Result<(GenerateParams, Option<Resume>), BackendError> {
    let with = |kept: &str, counted: u32| {
        let mut p = base.clone();
        p.prompt = Some(format!("{rendered}{kept}"));
        p.messages.clear();
        p.max_new_tokens = base.max_new_tokens.map(|m| m.saturating_sub(counted));
        p
    };
    if !as_generated {
        return Ok((with(partial, 0), None));
    }
    let whole = backend.count_tokens(partial)? as u32;
    let greedy = base.temperature == Some(0.0) || base.top_k == Some(1);
    let cut = safe_cut(partial);
    if greedy && base.logprobs.is_none() && cut < partial.len() {
        let kept = &partial[..cut];
        let counted = if kept.is_empty() {
            0
        } else {
            backend.count_tokens(kept)? as u32
        };
        let params = with(kept, counted);
        if params.max_new_tokens != Some(0) {
            return Ok((
                params,
                Some(Resume {
                    overlap: partial[cut..].to_string(),
                    counted,
                    fallback: Some((with(partial, whole), whole)),
                }),
            ));
        }
    }
    Ok((
        with(partial, whole),
        Some(Resume {
            overlap: String::new(),
            counted: whole,
            fallback: None,
        }),
    ))
}

type Events = BoxStream<'static, Result<GenerateEvent, BackendError>>;

/// A job's generation: the backend's, or with `resume` the continuation's as the rest of
/// one uninterrupted run (the overlap dropped, usage counting the final message as output).
pub(super) fn generate(
    backend: &Arc<dyn LlmBackend>,
    params: GenerateParams,
    resume: Option<Resume>,
) -> Events {
    let Some(r) = resume else {
        return backend.generate_stream(params);
    };
    let state = Resumed {
        inner: start(backend, params),
        backend: backend.clone(),
        pending: String::new(),
        overlap: r.overlap,
        counted: r.counted,
        fallback: r.fallback,
        done: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        let ev = s.next().await?;
        Some((ev, s))
    })
    .boxed()
}

/// The backend's stream; with no tokens left (`max_new_tokens` 0: the final message used
/// them all), only the finish.
fn start(backend: &Arc<dyn LlmBackend>, params: GenerateParams) -> Events {
    if params.max_new_tokens == Some(0) {
        let prompt = params
            .prompt
            .as_deref()
            .map_or(0, |p| backend.count_tokens(p).unwrap_or(0)) as u32;
        return futures::stream::iter([Ok(GenerateEvent::Finish {
            finish_reason: FinishReason::Length,
            usage: Some(Usage::new(prompt, 0)),
        })])
        .boxed();
    }
    backend.generate_stream(params)
}

struct Resumed {
    backend: Arc<dyn LlmBackend>,
    inner: Events,
    /// Regenerated text not yet matched against all of `overlap`.
    pending: String,
    /// What is still to be regenerated and dropped (empty once checked).
    overlap: String,
    counted: u32,
    fallback: Option<(GenerateParams, u32)>,
    done: bool,
}

impl Resumed {
    async fn next(&mut self) -> Option<Result<GenerateEvent, BackendError>> {
        loop {
            if self.done {
                return None;
            }
            match self.inner.next().await {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Ok(GenerateEvent::Delta { text })) if !self.overlap.is_empty() => {
                    self.pending.push_str(&text);
                    if self.pending.len() < self.overlap.len() {
                        if self.overlap.starts_with(&self.pending) {
                            continue;
                        }
                    } else if self.pending.starts_with(&self.overlap) {
                        let rest = self.pending.split_off(self.overlap.len());
                        self.pending.clear();
                        self.overlap.clear();
                        if rest.is_empty() {
                            continue;
                        }
                        return Some(Ok(GenerateEvent::Delta { text: rest }));
                    }
                }
                // The overlap's tokens are dropped with its text.
                Some(Ok(GenerateEvent::Logprobs { .. })) if !self.overlap.is_empty() => continue,
                Some(Ok(GenerateEvent::Finish { .. })) if !self.overlap.is_empty() => {}
                Some(Ok(GenerateEvent::Finish {
                    finish_reason,
                    usage,
                })) => {
                    self.done = true;
                    // The earlier text counts as output, not prompt; the prompt's cached
                    // tokens stay reported (at most the client's own prompt).
                    let usage = usage.map(|u| {
                        let prompt = u.prompt_tokens.saturating_sub(self.counted);
                        Usage {
                            prompt_tokens_details: u.prompt_tokens_details.map(|d| {
                                crate::wire::worker::PromptTokensDetails {
                                    cached_tokens: d.cached_tokens.min(prompt),
                                }
                            }),
                            ..Usage::new(prompt, u.completion_tokens.saturating_add(self.counted))
                        }
                    });
                    return Some(Ok(GenerateEvent::Finish {
                        finish_reason,
                        usage,
                    }));
                }
                Some(other) => return Some(other),
            }
            // The model departed from the overlap.
            match self.fallback.take() {
                Some((params, counted)) => {
                    tracing::info!(
                        "the continuation departed from the text it regenerates; continuing the whole text instead"
                    );
                    self.inner = start(&self.backend, params);
                    self.counted = counted;
                    self.overlap.clear();
                    self.pending.clear();
                }
                None => {
                    self.done = true;
                    return Some(Err(BackendError::internal(
                        "the continuation departed from the text it regenerates",
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_before_the_last_space_led_word() {
        assert_eq!(safe_cut("The quick brown fo"), "The quick brown".len());
        assert_eq!(safe_cut("Hello, world. "), "Hello,".len());
        assert_eq!(safe_cut("One\n\nTwo three"), "One\n\nTwo".len());
        // No such place: a short text is generated again whole, a long one is not cut.
        assert_eq!(safe_cut("Hello"), 0);
        assert_eq!(safe_cut("a  b"), 0, "a space after a space is no boundary");
        let long = "x".repeat(CUT_WINDOW + 10);
        assert_eq!(safe_cut(&long), long.len());
        let far = format!("a b{}", "y".repeat(CUT_WINDOW));
        assert_eq!(
            safe_cut(&far),
            far.len(),
            "only the last bytes are searched"
        );
        assert_eq!(safe_cut("日本 語"), "日本".len());
    }
}
