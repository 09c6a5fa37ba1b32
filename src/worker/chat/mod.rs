//! The local OpenAI engine: answers a client's chat or text completion request body with
//! exactly OpenAI's answer (a JSON body, or SSE chunks ending in `data: [DONE]`) from a
//! local [`LlmBackend`]. This module owns the whole translation: validating the request
//! ([`request`]), turning messages, tools and `response_format` into backend
//! [`GenerateParams`] — the backend's own chat template with the generic tool format
//! ([`tools`]), or an operator's Jinja template ([`template`]) — forcing tool calls and
//! structured output with grammars, running the `n` choices one after another, and
//! shaping text, tool calls, log-probabilities and usage into OpenAI's objects
//! ([`answer`]). The HTTP routes that call it are the worker's.

mod answer;
mod request;
mod resume;
mod template;
mod tools;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::Arc;

use axum::http::StatusCode;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::Value;

pub use template::{ChatTemplate, TemplateError};

use crate::openai::OpenAiError;
use crate::openai::request::Sampling;
use crate::openai::response::{DONE, Envelope, Kind, sse};
use crate::worker::backends::{
    BackendError, FinishReason, GenerateEvent, GenerateParams, LlmBackend, TokenLogprob, Usage,
};
use answer::Finished;
use request::{ChatRequest, Tool, ToolChoice};
use tools::ParsedCall;

/// The engine's answer: the whole JSON body, or SSE events (`data: [DONE]\n\n` last).
pub enum Answer {
    Whole(Bytes),
    Stream(BoxStream<'static, Bytes>),
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Whole(b) => f.debug_tuple("Whole").field(b).finish(),
            Answer::Stream(_) => f.write_str("Stream(..)"),
        }
    }
}

/// The backend's own rendering of a conversation with the assistant's turn opened (the
/// prompt it generates from for `messages`): how a final assistant message is continued
/// on a model without an operator's template ([`resume`]).
pub type RenderChat = Arc<
    dyn Fn(&[crate::worker::backends::ChatMessage]) -> Result<String, BackendError> + Send + Sync,
>;

/// How a worker's engine renders prompts.
#[derive(Clone, Default)]
pub struct ChatOptions {
    /// An operator's chat template (`--chat_template FILE`) used instead of the model's
    /// own: it renders the whole prompt, tools included.
    pub template: Option<Arc<ChatTemplate>>,
    /// The backend's rendering (a local model's), for continuations.
    pub render: Option<RenderChat>,
}

impl std::fmt::Debug for ChatOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatOptions")
            .field("template", &self.template)
            .field("render", &self.render.is_some())
            .finish()
    }
}

impl ChatOptions {
    /// Options rendering prompts with the template in `path` (`--chat_template FILE`): Jinja
    /// text, or a Hugging Face `tokenizer_config.json` carrying one.
    pub fn with_template_file(path: &std::path::Path) -> Result<ChatOptions, TemplateError> {
        Ok(ChatOptions {
            template: Some(Arc::new(ChatTemplate::load(path)?)),
            render: None,
        })
    }
}

/// Answers a chat completion request body with the model's own chat template.
pub async fn chat_completions(
    backend: Arc<dyn LlmBackend>,
    body: &[u8],
) -> Result<Answer, OpenAiError> {
    chat_completions_with(backend, &ChatOptions::default(), body).await
}

/// Answers a chat completion request body.
pub async fn chat_completions_with(
    backend: Arc<dyn LlmBackend>,
    opts: &ChatOptions,
    body: &[u8],
) -> Result<Answer, OpenAiError> {
    let req = request::parse_chat(body)?;
    let plan = chat_plan(req, opts, backend.as_ref())?;
    run(backend, plan).await
}

/// Answers a legacy text completion request body (the prompt is sent as is, no template).
pub async fn completions(backend: Arc<dyn LlmBackend>, body: &[u8]) -> Result<Answer, OpenAiError> {
    let req = request::parse_text(body)?;
    let base = base_params(&req.sampling);
    let mut jobs = VecDeque::with_capacity(req.prompts.len() * req.n);
    for (g, p) in req.prompts.iter().enumerate() {
        for j in 0..req.n {
            let mut params = base.clone();
            params.prompt = Some(p.clone());
            params.logprobs = req.logprobs;
            vary_seed(&mut params, j);
            jobs.push_back(Job {
                index: g * req.n + j,
                group: g,
                params,
                echo: req.echo.then(|| p.clone()),
                resume: None,
            });
        }
    }
    run(
        backend,
        Plan {
            env: Envelope::new(Kind::Text, req.model, req.include_usage),
            jobs,
            tools: None,
            logprobs: req.logprobs.is_some(),
            stream: req.stream,
            prompt_field: "prompt",
        },
    )
    .await
}

/// Tools the answer may call.
struct ToolSet {
    tools: Vec<Tool>,
    /// A call is certain (required or named choice): hold the whole stream.
    forced: bool,
    parallel: bool,
}

/// One choice to generate.
struct Job {
    index: usize,
    /// Which prompt (text completions with several prompts); choices of one prompt share
    /// its prompt tokens in `usage`.
    group: usize,
    params: GenerateParams,
    /// Text completions with `echo`: the prompt, prepended to the text.
    echo: Option<String>,
    /// A continuation of the final message counted as generated ([`resume`]).
    resume: Option<resume::Resume>,
}

struct Plan {
    env: Envelope,
    jobs: VecDeque<Job>,
    tools: Option<Arc<ToolSet>>,
    logprobs: bool,
    stream: bool,
    /// The request field a backend's refusal (prompt too long) names.
    prompt_field: &'static str,
}

fn base_params(s: &Sampling) -> GenerateParams {
    let stop = match &s.stop {
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Array(many)) => many
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    GenerateParams {
        temperature: s.temperature.map(|t| t as f32),
        top_p: s.top_p.map(|t| t as f32),
        top_k: s.top_k.map(|k| k as i32),
        max_new_tokens: s.max_tokens.map(|m| m as u32),
        stop,
        seed: s.seed.map(|s| s as u64),
        presence_penalty: s.presence_penalty.map(|p| p as f32),
        frequency_penalty: s.frequency_penalty.map(|p| p as f32),
        ..Default::default()
    }
}

/// Choices of one request with a seed get distinct seeds (else they would be identical).
fn vary_seed(p: &mut GenerateParams, choice: usize) {
    if let Some(s) = &mut p.seed {
        *s = s.wrapping_add(choice as u64);
    }
}

fn chat_plan(
    req: ChatRequest,
    opts: &ChatOptions,
    backend: &dyn LlmBackend,
) -> Result<Plan, OpenAiError> {
    let offered = !req.tools.is_empty() && req.tool_choice != ToolChoice::None;
    let forced = offered && matches!(req.tool_choice, ToolChoice::Required | ToolChoice::Named(_));
    let mut base = base_params(&req.sampling);
    base.logprobs = req.logprobs;
    base.grammar = if forced {
        Some(tools::forced_grammar(
            &req.tools,
            &req.tool_choice,
            req.parallel_tool_calls,
        )?)
    } else {
        tools::format_grammar(&req.response_format)?
    };
    let mut resume = None;
    if let Some(c) = req.continuation {
        let (params, r) = continuation_params(&req, opts, backend, &base, c)?;
        base = params;
        resume = r;
    } else {
        match &opts.template {
            Some(t) => {
                let prompt = t
                    .render(&req.messages, offered.then_some(&req.tools[..]))
                    .map_err(|e| {
                        OpenAiError::invalid(
                            "messages",
                            "invalid_prompt",
                            format!("the chat template cannot render these messages: {e}"),
                        )
                    })?;
                base.prompt = Some(prompt);
            }
            None => {
                let prompt = offered.then(|| {
                    tools::system_prompt(&req.tools, &req.tool_choice, req.parallel_tool_calls)
                });
                base.messages = tools::generic_messages(&req.messages, prompt);
            }
        }
    }
    let jobs = (0..req.n)
        .map(|i| {
            let mut params = base.clone();
            vary_seed(&mut params, i);
            Job {
                index: i,
                group: 0,
                params,
                echo: None,
                resume: resume.clone(),
            }
        })
        .collect();
    // With a named choice only that tool may come back.
    let tools = match &req.tool_choice {
        ToolChoice::Named(n) => req.tools.into_iter().filter(|t| &t.name == n).collect(),
        _ => req.tools,
    };
    Ok(Plan {
        env: Envelope::new(Kind::Chat, req.model, req.include_usage),
        jobs,
        tools: offered.then(|| {
            Arc::new(ToolSet {
                tools,
                forced,
                parallel: req.parallel_tool_calls,
            })
        }),
        logprobs: req.logprobs.is_some(),
        stream: req.stream,
        prompt_field: "messages",
    })
}

/// The generation of a request continuing its final assistant message: the conversation
/// before it rendered with the assistant's turn opened (the operator's template, else the
/// backend's own rendering), then the message's text ([`resume`]).
fn continuation_params(
    req: &ChatRequest,
    opts: &ChatOptions,
    backend: &dyn LlmBackend,
    base: &GenerateParams,
    c: request::Continuation,
) -> Result<(GenerateParams, Option<resume::Resume>), OpenAiError> {
    let (before, last) = req.messages.split_at(req.messages.len() - 1);
    let partial = last[0].content.as_deref().unwrap_or_default();
    let rendered = match (&opts.template, &opts.render) {
        (Some(t), _) => t.render(before, None).map_err(|e| {
            OpenAiError::invalid(
                "messages",
                "invalid_prompt",
                format!("the chat template cannot render these messages: {e}"),
            )
        })?,
        (None, Some(render)) => render(&tools::generic_messages(before, None))
            .map_err(|e| backend_error(e, "messages"))?,
        (None, None) => {
            return Err(OpenAiError::invalid(
                crate::openai::continuation::CONTINUE_FIELD,
                "unsupported_parameter",
                "this model cannot continue a final message (its prompt is not rendered here)",
            ));
        }
    };
    resume::plan(backend, base, &rendered, partial, c.as_generated)
        .map_err(|e| backend_error(e, "messages"))
}

/// A backend failure as the client's answer: its refusal a 400 naming the prompt field,
/// an upstream's failure its status, anything else a 500.
fn backend_error(e: BackendError, field: &str) -> OpenAiError {
    match e {
        BackendError::BadRequest(m) => OpenAiError::invalid(field, "invalid_prompt", m),
        BackendError::Upstream { status, message } => OpenAiError::new(
            status
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::BAD_GATEWAY),
            "server_error",
            "upstream_error",
            message,
        ),
        BackendError::Overloaded {
            message,
            retry_after_secs,
        } => OpenAiError::overloaded(message, retry_after_secs),
        e @ (BackendError::Internal(_) | BackendError::Load { .. }) => OpenAiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "model_error",
            e.to_string(),
        ),
    }
}

fn no_finish() -> BackendError {
    BackendError::internal("the model's output ended without a finish")
}

/// Usage over all choices: completion tokens of every choice, prompt tokens once per prompt
/// (as OpenAI counts `n` > 1).
#[derive(Default)]
struct Tally {
    usage: Usage,
    last_group: Option<usize>,
}

impl Tally {
    fn add(&mut self, group: usize, u: Option<Usage>) {
        let u = u.unwrap_or_default();
        let prompt = if self.last_group == Some(group) {
            0
        } else {
            u.prompt_tokens
        };
        self.last_group = Some(group);
        self.usage.add(prompt, u.completion_tokens);
        if prompt > 0
            && let Some(d) = u.prompt_tokens_details
        {
            self.usage.add_cached(d.cached_tokens);
        }
    }
}

/// Output of one choice as it arrives: the text, its tokens (those not yet sent, when
/// streaming), and how much is held back while it may be a tool call.
struct Acc {
    text: String,
    tokens: Vec<TokenLogprob>,
    /// Characters of text already sent (text completions' `text_offset`).
    sent_chars: usize,
    /// Bytes of `text` already sent.
    sent: usize,
    holding: bool,
}

impl Acc {
    fn new(job: &Job, tools: Option<&ToolSet>) -> Acc {
        let echo = job.echo.clone().unwrap_or_default();
        Acc {
            sent_chars: echo.chars().count(),
            sent: echo.len(),
            text: echo,
            tokens: Vec::new(),
            holding: tools.is_some(),
        }
    }
}

/// Runs every job: the whole answer, or a stream of chunks.
async fn run(backend: Arc<dyn LlmBackend>, mut plan: Plan) -> Result<Answer, OpenAiError> {
    if plan.stream {
        let mut s = Streamer {
            backend,
            plan,
            cur: None,
            tally: Tally::default(),
            done: false,
        };
        // The first event (or failure) before answering, so that a refused request is an
        // HTTP error rather than an error event.
        s.begin_next().await?;
        let stream = futures::stream::unfold(s, |mut s| async move {
            let out = s.step().await?;
            Some((out, s))
        })
        .flat_map(futures::stream::iter)
        .boxed();
        return Ok(Answer::Stream(stream));
    }
    let mut tally = Tally::default();
    let mut finished = Vec::with_capacity(plan.jobs.len());
    while let Some(job) = plan.jobs.pop_front() {
        let mut acc = Acc::new(&job, plan.tools.as_deref());
        let mut stream = resume::generate(&backend, job.params, job.resume);
        let (reason, usage) = loop {
            match stream.next().await {
                Some(Ok(GenerateEvent::Logprobs { tokens })) => acc.tokens.extend(tokens),
                Some(Ok(GenerateEvent::Delta { text })) => acc.text.push_str(&text),
                Some(Ok(GenerateEvent::Finish {
                    finish_reason,
                    usage,
                })) => break (finish_reason, usage),
                Some(Err(e)) => return Err(backend_error(e, plan.prompt_field)),
                None => return Err(backend_error(no_finish(), plan.prompt_field)),
            }
        };
        tally.add(job.group, usage);
        let calls = plan
            .tools
            .as_ref()
            .and_then(|t| tools::parse_calls(&acc.text, &t.tools, t.parallel));
        let logprobs = if !plan.logprobs {
            Value::Null
        } else if plan.env.kind == Kind::Chat {
            answer::chat_logprobs(&acc.tokens)
        } else {
            let echo = job.echo.as_deref().map_or(0, |e| e.chars().count());
            answer::text_logprobs(&acc.tokens, echo)
        };
        finished.push(Finished {
            index: job.index,
            finish_reason: if calls.is_some() {
                "tool_calls"
            } else {
                reason.as_str()
            },
            text: acc.text,
            calls,
            logprobs,
        });
    }
    Ok(Answer::Whole(answer::whole(
        &plan.env,
        finished,
        &tally.usage,
    )))
}

/// The choice being streamed.
struct Running {
    index: usize,
    group: usize,
    stream: BoxStream<'static, Result<GenerateEvent, BackendError>>,
    acc: Acc,
    /// An event already read (the first one, read before answering).
    first: Option<Result<GenerateEvent, BackendError>>,
    /// Whether the choice's opening chunk was sent.
    opened: bool,
}

struct Streamer {
    backend: Arc<dyn LlmBackend>,
    plan: Plan,
    cur: Option<Running>,
    tally: Tally,
    done: bool,
}

impl Streamer {
    /// Starts the next job and reads its first event; a failure there is returned.
    async fn begin_next(&mut self) -> Result<(), OpenAiError> {
        let Some(job) = self.plan.jobs.pop_front() else {
            return Ok(());
        };
        let acc = Acc::new(&job, self.plan.tools.as_deref());
        let mut stream = resume::generate(&self.backend, job.params, job.resume);
        let first = stream.next().await.unwrap_or_else(|| Err(no_finish()));
        let first = match first {
            Err(e) => return Err(backend_error(e, self.plan.prompt_field)),
            ok => ok,
        };
        self.cur = Some(Running {
            index: job.index,
            group: job.group,
            stream,
            acc,
            first: Some(first),
            opened: false,
        });
        Ok(())
    }

    /// The next events to send (possibly none); `None` after `[DONE]`.
    async fn step(&mut self) -> Option<Vec<Bytes>> {
        if self.done {
            return None;
        }
        if self.cur.is_none() {
            if self.plan.jobs.is_empty() {
                self.done = true;
                let mut out = Vec::with_capacity(2);
                if self.plan.env.include_usage {
                    out.push(answer::usage_chunk(&self.plan.env, &self.tally.usage));
                }
                out.push(Bytes::from_static(DONE));
                return Some(out);
            }
            if let Err(e) = self.begin_next().await {
                return Some(self.fail(e));
            }
        }
        let env = &self.plan.env;
        let run = self.cur.as_mut()?;
        let mut out = Vec::new();
        if !run.opened {
            run.opened = true;
            match env.kind {
                Kind::Chat => {
                    let forced = self.plan.tools.as_ref().is_some_and(|t| t.forced);
                    let content = if forced { Value::Null } else { Value::from("") };
                    out.push(answer::chunk(
                        env,
                        vec![answer::delta(
                            run.index,
                            serde_json::json!({"role": "assistant", "content": content}),
                            Value::Null,
                            None,
                        )],
                    ));
                }
                Kind::Text if run.acc.sent > 0 => {
                    out.push(answer::chunk(
                        env,
                        vec![answer::text_piece(
                            run.index,
                            &run.acc.text,
                            Value::Null,
                            None,
                        )],
                    ));
                }
                Kind::Text => {}
            }
        }
        let ev = match run.first.take() {
            Some(ev) => Some(ev),
            None => run.stream.next().await,
        };
        match ev {
            Some(Ok(GenerateEvent::Logprobs { tokens })) => run.acc.tokens.extend(tokens),
            Some(Ok(GenerateEvent::Delta { text })) => {
                run.acc.text.push_str(&text);
                if run.acc.holding {
                    let tools = self.plan.tools.as_deref();
                    let hold = tools.is_some_and(|t| t.forced)
                        || tools::may_be_call(&run.acc.text[run.acc.sent..]);
                    run.acc.holding = hold;
                }
                if !run.acc.holding
                    && let Some(c) = content_chunk(env, self.plan.logprobs, run)
                {
                    out.push(c);
                }
            }
            Some(Ok(GenerateEvent::Finish {
                finish_reason,
                usage,
            })) => {
                self.tally.add(run.group, usage);
                let calls = match (&self.plan.tools, run.acc.holding) {
                    (Some(t), true) => {
                        tools::parse_calls(&run.acc.text[run.acc.sent..], &t.tools, t.parallel)
                    }
                    _ => None,
                };
                out.extend(finish_chunks(
                    env,
                    self.plan.logprobs,
                    run,
                    calls.as_deref(),
                    finish_reason,
                ));
                self.cur = None;
            }
            Some(Err(e)) => {
                let e = backend_error(e, self.plan.prompt_field);
                out.extend(self.fail(e));
            }
            None => {
                let e = backend_error(no_finish(), self.plan.prompt_field);
                out.extend(self.fail(e));
            }
        }
        Some(out)
    }

    /// An error event and `[DONE]`, ending the stream.
    fn fail(&mut self, e: OpenAiError) -> Vec<Bytes> {
        self.done = true;
        self.cur = None;
        vec![sse(&e.body()), Bytes::from_static(DONE)]
    }
}

/// The logprobs of the tokens not yet sent (taken), shaped for the request's API.
fn take_logprobs(env: &Envelope, want: bool, run: &mut Running, offset: usize) -> Value {
    if !want {
        return Value::Null;
    }
    let tokens = std::mem::take(&mut run.acc.tokens);
    match env.kind {
        Kind::Chat => answer::chat_logprobs(&tokens),
        Kind::Text => answer::text_logprobs(&tokens, offset),
    }
}

/// A chunk of the text not yet sent (with its tokens), or `None` when there is none.
fn content_chunk(env: &Envelope, want_lp: bool, run: &mut Running) -> Option<Bytes> {
    if run.acc.sent == run.acc.text.len() && run.acc.tokens.is_empty() {
        return None;
    }
    let offset = run.acc.sent_chars;
    let logprobs = take_logprobs(env, want_lp, run, offset);
    let new = &run.acc.text[run.acc.sent..];
    let choice = match env.kind {
        Kind::Chat => answer::delta(
            run.index,
            serde_json::json!({"content": new}),
            logprobs,
            None,
        ),
        Kind::Text => answer::text_piece(run.index, new, logprobs, None),
    };
    run.acc.sent_chars += new.chars().count();
    run.acc.sent = run.acc.text.len();
    Some(answer::chunk(env, vec![choice]))
}

/// The end of a choice: held text as tool calls or content, then the finish chunk.
fn finish_chunks(
    env: &Envelope,
    want_lp: bool,
    run: &mut Running,
    calls: Option<&[ParsedCall]>,
    reason: FinishReason,
) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(4);
    let reason = match calls {
        Some(calls) => {
            let offset = run.acc.sent_chars;
            let logprobs = take_logprobs(env, want_lp, run, offset);
            let deltas = answer::tool_call_deltas(run.index, calls, logprobs);
            out.extend(deltas.into_iter().map(|d| answer::chunk(env, vec![d])));
            "tool_calls"
        }
        None => {
            out.extend(content_chunk(env, want_lp, run));
            reason.as_str()
        }
    };
    let last = match env.kind {
        Kind::Chat => answer::delta(run.index, serde_json::json!({}), Value::Null, Some(reason)),
        Kind::Text => answer::text_piece(run.index, "", Value::Null, Some(reason)),
    };
    out.push(answer::chunk(env, vec![last]));
    out
}
