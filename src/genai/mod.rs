//! Token usage read out of LLM response bodies, protocol-free (CONTRACT §11): bytes in, [`Usage`] and an
//! [`Outcome`] out. The ext_proc adapter (`envoy`) feeds each body chunk to a [`Scanner`]; nothing here knows
//! Envoy, protobuf or gRPC.
//!
//! ```text
//! chunk ─> decode (content-encoding: identity | gzip | deflate; br, zstd: Unreadable)
//!       ─> application/json:  buffer ≤ max_buffer, parse once at finish
//!          text/event-stream: sse::Splitter ─> each complete event's data parsed alone, the stream never held
//!          other:             JSON if the first non-blank byte is `{` or `[`, else Missing
//!       ─> usage: the provider fields of each document, merged (latest value of each field wins)
//! ```
//!
//! # Shapes and their sources
//!
//! | provider | JSON body | stream (SSE) |
//! |---|---|---|
//! | OpenAI chat completions | `usage.prompt_tokens`, `completion_tokens`, `total_tokens` | `data: {chunk}` with `usage: null`, and with `stream_options: {include_usage: true}` one more chunk (`choices: []`) carrying `usage` before `data: [DONE]`; without it no usage at all: `Missing` |
//! | OpenAI responses | `usage.input_tokens`, `output_tokens`, `total_tokens` | `event: response.completed` (or `response.incomplete`, `response.failed`) whose data has `response.usage`; earlier events carry `response.usage: null`; no `[DONE]` |
//! | Anthropic messages | `usage.input_tokens`, `output_tokens`, `cache_creation_input_tokens`, `cache_read_input_tokens` | `message_start` with `message.usage` (input, cache, initial output), `message_delta` with cumulative `usage` (output, possibly input and cache), `message_stop` |
//! | Gemini generateContent | `usageMetadata.promptTokenCount`, `candidatesTokenCount`, `thoughtsTokenCount`, `toolUsePromptTokenCount`, `totalTokenCount` | `streamGenerateContent?alt=sse`: every `data:` chunk is a whole response with cumulative `usageMetadata`; the last wins. Without `alt=sse` the body is a JSON array of them, read the same way |
//!
//! Sources (public API references): OpenAI's OpenAPI spec, `ChatCompletionStreamOptions.include_usage`
//! ("an additional chunk … before the `data: [DONE]` message … All other chunks will also include a usage
//! field, but with a null value") and `ResponseUsage` (`input_tokens_details.cached_tokens` and
//! `output_tokens_details.reasoning_tokens` are breakdowns, already inside the two counts);
//! developers.openai.com/api/reference/resources/responses/streaming-events (`response.completed`,
//! `response.incomplete`, `response.failed` carry the final `response`); docs.anthropic.com
//! build-with-claude/streaming ("The token counts shown in the usage field of the message_delta event are
//! cumulative") and the Messages `Usage` object (cache reads and writes are counted apart from
//! `input_tokens`); ai.google.dev/api/generate-content `UsageMetadata` (`promptTokenCount` includes
//! `cachedContentTokenCount`; `totalTokenCount` is the sum of prompt, candidates, tool-use prompt and
//! thoughts).
//!
//! # Decisions
//!
//! - **Input is billed input.** Anthropic: `input_tokens + cache_creation_input_tokens +
//!   cache_read_input_tokens`, because Anthropic reports cache writes and reads apart from `input_tokens` and
//!   bills both (at other rates: tollgate counts tokens, not prices); leaving them out would let a 100k-token
//!   cached prompt pass a token quota as 5 tokens. Gemini: `promptTokenCount + toolUsePromptTokenCount`. OpenAI
//!   already counts cached tokens inside `prompt_tokens`/`input_tokens`. An operator who wants Anthropic's
//!   bare figure meters `response_json:/usage/input_tokens`.
//! - **Output includes thinking.** Gemini: `candidatesTokenCount + thoughtsTokenCount` (thoughts are billed
//!   as output, as OpenAI's `reasoning_tokens` are inside `completion_tokens`), so for every provider
//!   input + output = the reported total.
//! - **Total** is the reported `total_tokens`/`totalTokenCount` when present, else input + output when both
//!   are known (Anthropic reports none). A sum that overflows u64 is not a count: `None`.
//! - **Latest wins, per field.** Stream counts are cumulative, so a later document replaces each field it
//!   reports and keeps the others (Anthropic's `message_delta` may report only `output_tokens`).
//! - **Counts** are JSON non-negative integers, also written `12.0` or `"12"` (proto3 JSON writes 64-bit
//!   integers as strings). Anything else at a provider field is ignored.
//! - **`response_json:<pointer>`**: an RFC 6901 pointer (`serde_json::Value::pointer`) applied to the JSON
//!   body, or to each SSE event's data (latest wins). A count as above is taken; `null` or no such member is
//!   nothing; any other value (negative, fractional, a non-numeric string, an object) is ignored and counted in
//!   [`Scanner::unreadable_pointers`].
//! - **Never a guess.** A JSON body past `max_buffer`, truncated, non-UTF-8 or not JSON is
//!   `Unreadable(reason)` and nothing is billed from it. An SSE event that cannot be read (past
//!   `max_buffer`, non-UTF-8, not JSON) is skipped and counted ([`Scanner::unreadable_events`]); the stream
//!   goes on.
//!
//! # Outcomes
//!
//! | outcome | when |
//! |---|---|
//! | `Complete` | `finish` ran and some usage was read (for SSE: and no event after the last usage was unreadable) |
//! | `Partial` | usage was seen, but the stream was not finished (client gone: bill [`Scanner::usage`]), its encoding broke later, or an event after the last usage was unreadable |
//! | `Counted` | a stream reported no usage but sent content deltas: its output is their count (below) |
//! | `Missing` | the body said nothing about usage and sent no content (not JSON, empty) |
//! | `Unreadable(reason)` | no usage, and something could not be read: [`Reason`] says what |
//!
//! # Floors: a stream bills at least what it sent
//!
//! OpenAI reports a stream's usage only in its last event, and only when the client asked for it
//! (`stream_options.include_usage`); Anthropic reports the output count at the end (`message_delta`). A client
//! that cuts the stream before that event, or never asks, must not get the answer for free (CONTRACT §11:
//! "streams cut by the client bill what was sent"). So every stream event is also read for the content it
//! sends: a non-empty OpenAI chat `choices[].delta` (`content`, `refusal`, `reasoning_content`, tool-call
//! `arguments`), an OpenAI responses `*.delta` string, an Anthropic `content_block_delta` (`text`,
//! `partial_json`, `thinking`). Each such delta carries at least one token, so until the body ends with its
//! usage read, the output billed is max(reported output, deltas sent) and the total at least the reported
//! input plus that output. OpenAI streams one token per delta, so for OpenAI this is the output sent;
//! Anthropic streams several tokens per delta, so for Anthropic it is a floor (its input is exact, from
//! `message_start`). Not counted: the input of an OpenAI stream cut before its usage (OpenAI never says it
//! earlier; counting it means tokenizing the request), and text in a chunk Envoy had not yet passed on. A
//! body that ends with its usage read bills exactly that usage.
//!
//! # Bounds
//!
//! JSON holds at most `max_buffer` decoded bytes (capacity included); SSE holds one partial line (≤
//! `max_buffer` + 64) and one event's data (≤ `max_buffer` + 1). Decoding pushes at most 32 KiB at a time
//! into the reader, which refuses bytes it no longer needs, so a gzip bomb stops inflating once a JSON body
//! passes its bound. Per chunk an SSE stream costs a scan for line ends, one copy of each data line, and a
//! parse of each complete event that skips everything but the four usage carriers (`usage`,
//! `usageMetadata`, `response.usage`, `message.usage`) without allocating; with pointers configured each
//! event is parsed whole.

mod decode;
mod scan;
pub mod session;
mod sse;
mod usage;

#[cfg(test)]
mod tests;

pub use scan::{Outcome, Reason, Scanner};
pub use usage::{
    INPUT_TOKENS, OUTPUT_TOKENS, RESPONSE_JSON, TOTAL_TOKENS, Usage, is_body_meter,
    response_json_pointer,
};
